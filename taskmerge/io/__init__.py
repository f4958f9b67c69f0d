"""Checkpoint input and output: lazy readers for safetensors / PyTorch / Hugging Face folders and PEFT
LoRA adapters, an atomic, sharded safetensors writer, and LoRA adapter export."""

from taskmerge.io.peft import PeftAdapterSource, is_adapter
from taskmerge.io.readers import CheckpointReader, DictSource, TensorSource, open_checkpoint
from taskmerge.io.writers import CheckpointWriter

__all__ = ["CheckpointReader", "CheckpointWriter", "DictSource", "PeftAdapterSource", "TensorSource", "is_adapter",
           "open_checkpoint"]
