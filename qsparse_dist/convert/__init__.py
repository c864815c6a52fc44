"""Conversion from other checkpoint formats into the project's reference layout
(``qsparse_dist.model.reference``): Hugging Face Llama / Mistral / Qwen2 / Mixtral (``import-hf``)."""

from .hf_import import (
    SUPPORTED_ARCHITECTURES,
    HFImportError,
    SafetensorsSource,
    hf_to_reference_state_dict,
    model_config_from_hf,
    read_hf_config,
    reference_tensors,
)
from .imported import check_model_matches, import_hf, load_imported

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFImportError",
    "SafetensorsSource",
    "check_model_matches",
    "hf_to_reference_state_dict",
    "import_hf",
    "load_imported",
    "model_config_from_hf",
    "read_hf_config",
    "reference_tensors",
]
