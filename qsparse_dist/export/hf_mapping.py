"""The export side of the Hugging Face mapping: :mod:`qsparse_dist.model.adapters.hf` (where names and
config fields are defined, once) with its errors raised as :class:`~.errors.ExportError`, the error
type of ``export`` and of the runtime that reads exports back."""

from __future__ import annotations

import functools

from ..model.adapters import hf as _hf
from ..model.adapters.hf import HF_ACT, TERNARY_PROJECTIONS, hf_config_dict
from .errors import ExportError

__all__ = [
    "HF_ACT",
    "reference_to_hf",
    "hf_to_reference",
    "hf_config_dict",
    "configs_from_hf",
    "TERNARY_PROJECTIONS",
]


def _as_export_error(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _hf.HFMappingError as e:
            raise ExportError(str(e)) from None

    return wrapped


reference_to_hf = _as_export_error(_hf.reference_to_hf)
hf_to_reference = _as_export_error(_hf.hf_to_reference)
configs_from_hf = _as_export_error(_hf.configs_from_hf)
