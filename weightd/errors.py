"""weightd's errors: the very classes the client re-raises, from the dependency-free
``weightd_errors`` package (shipped with weightd-client), so that importing the store,
the formats or the sources does not import grpc."""

from weightd_errors import *  # noqa: F403
from weightd_errors import __all__ as __all__
