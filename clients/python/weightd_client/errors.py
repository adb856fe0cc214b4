"""The errors weightd raises and this client re-raises (the classes live in the
dependency-free ``weightd_errors`` package, shared with the daemon)."""

from weightd_errors import *  # noqa: F403
from weightd_errors import __all__ as __all__
