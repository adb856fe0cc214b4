"""Engines that take their weights from weightd, one module an engine.

* :mod:`weightd_client.integrations.vllm`: vLLM's model loader plugin,
  ``vllm serve DIR --load-format weightd`` (entry point ``vllm.general_plugins``).
* :mod:`weightd_client.integrations.transformers`: a transformers model built from a
  weightd load in one call, its parameters views of the daemon's pages.

Each module imports its engine only when it is used: ``import weightd_client`` never
imports vLLM or transformers, and the extras that name them (``weightd-client[vllm]``)
pull nothing heavy (the model server brings its own engine). docs/engines.md has the
commands, SGLang, TGI and TEI included, and what each shares.
"""
