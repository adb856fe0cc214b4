"""Real servers and synthetic models for weightd's tests, benchmarks and demo.

Everything here listens on 127.0.0.1 only, on a port the kernel picks. moto is a
development dependency and is imported only when an S3 server is started.
"""

from weightd.testing.models import TINY_LLAMA_CONFIG, write_synthetic_model, write_tiny_llama
from weightd.testing.servers import MotoS3Server, RangeHTTPServer, RequestLog

__all__ = [
    "TINY_LLAMA_CONFIG",
    "MotoS3Server",
    "RangeHTTPServer",
    "RequestLog",
    "write_synthetic_model",
    "write_tiny_llama",
]
