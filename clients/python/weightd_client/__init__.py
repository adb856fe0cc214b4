"""weightd_client: model weights from the node's weightd daemon, as zero-copy tensors.

The daemon keeps models cached and resident; this package leases one and returns its
tensors as views of the daemon's pages (nothing is copied on the host), and loads
straight from the source when the daemon cannot be reached.

Example
-------
>>> import weightd_client
>>> with weightd_client.load("s3://models/llama-3-8b") as weights:    # doctest: +SKIP
...     model.load_state_dict(weights, assign=True)
...     tokenizer = AutoTokenizer.from_pretrained(weights.snapshot_path)

With an explicit client (its own socket, deadline and name in the daemon's status):

>>> from weightd_client import Client
>>> with Client(name="replica 3") as client:                           # doctest: +SKIP
...     client.fetch("hf://org/model")                                 # warm the cache
...     weights = client.load("hf://org/model")

Tensors as they land, while the model is still being downloaded (what an engine's
weight iterator wants):

>>> with weightd_client.stream("hf://org/model") as weights:           # doctest: +SKIP
...     for name, tensor in weights:
...         params[name].copy_(tensor)

torch is needed only to build tensors: ``pip install 'weightd-client[torch]'``.
"""

from weightd_client import errors
from weightd_client.client import (
    Client,
    LoadedModel,
    default_socket,
    device_to_wire,
    fetch,
    load,
    stream,
)
from weightd_client.streaming import StreamedModel

__version__ = "0.1.0"

__all__ = [
    "Client",
    "LoadedModel",
    "StreamedModel",
    "default_socket",
    "device_to_wire",
    "errors",
    "fetch",
    "load",
    "stream",
]
