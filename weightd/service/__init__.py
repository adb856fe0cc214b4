"""The gRPC servicer: translates requests into calls on the node and errors into status
codes. It holds no business logic (that is weightd/node.py)."""

from weightd.service.servicer import ERROR_CODES, WeightdServicer, status_for

__all__ = ["ERROR_CODES", "WeightdServicer", "status_for"]
