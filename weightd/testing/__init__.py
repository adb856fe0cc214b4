"""Real servers and synthetic models for weightd's tests, benchmarks and demo.

Everything here listens on 127.0.0.1 only, on a port the kernel picks. moto is a
development dependency and is imported only when an S3 server is started.
"""

from weightd.testing.models import write_synthetic_model
from weightd.testing.servers import MotoS3Server, RangeHTTPServer, RequestLog

__all__ = ["MotoS3Server", "RangeHTTPServer", "RequestLog", "write_synthetic_model"]
