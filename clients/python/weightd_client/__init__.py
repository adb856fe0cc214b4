"""weightd_client: load model weights from the weightd daemon as zero-copy tensors."""

__version__ = "0.1.0"
