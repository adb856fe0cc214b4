"""Real servers and synthetic models for weightd's tests, benchmarks and demo.

Everything here listens on 127.0.0.1 only, on a port the kernel picks. moto is a
development dependency and is imported only when an S3 server is started.
"""

from weightd.testing.hub import FakeHub
from weightd.testing.models import TINY_LLAMA_CONFIG, write_synthetic_model, write_tiny_llama
from weightd.testing.proxy import ForwardProxy
from weightd.testing.servers import (
    Fault,
    Lie,
    MotoS3Server,
    RangeHTTPServer,
    RequestLog,
    TokenBucket,
)

__all__ = [
    "TINY_LLAMA_CONFIG",
    "FakeHub",
    "Fault",
    "ForwardProxy",
    "Lie",
    "MotoS3Server",
    "RangeHTTPServer",
    "RequestLog",
    "TokenBucket",
    "write_synthetic_model",
    "write_tiny_llama",
]
