"""Export trained checkpoints to single-GPU inference formats.

* :func:`load_checkpoint` — consolidate a run / checkpoint directory into the full reference state dict.
* :func:`export_hf` — Hugging Face directory (stock Llama/Qwen2/Mixtral when dense, remote code otherwise).
* :func:`export_gguf` — GGUF for llama.cpp (dense Llama-style F32/F16/Q8_0, ternary TQ2_0).
"""

from .consolidate import Consolidated, load_checkpoint, load_reference_checkpoint, save_reference_checkpoint
from .errors import CheckpointError, ExportError, UnsupportedExportError
from .gguf_writer import export_gguf
from .hf import export_hf

__all__ = [
    "CheckpointError",
    "Consolidated",
    "ExportError",
    "UnsupportedExportError",
    "export_gguf",
    "export_hf",
    "load_checkpoint",
    "load_reference_checkpoint",
    "save_reference_checkpoint",
]
