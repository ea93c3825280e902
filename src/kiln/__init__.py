"""kiln: pretrain and continue-train decoder-only language models."""

__version__ = "0.1.0"
