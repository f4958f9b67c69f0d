"""Checkpoint input and output: lazy readers for safetensors / PyTorch / Hugging Face folders, and an
atomic, sharded safetensors writer."""

from taskmerge.io.readers import CheckpointReader, DictSource, TensorSource, open_checkpoint
from taskmerge.io.writers import CheckpointWriter

__all__ = ["CheckpointReader", "CheckpointWriter", "DictSource", "TensorSource", "open_checkpoint"]
