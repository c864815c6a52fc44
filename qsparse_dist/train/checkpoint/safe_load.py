"""Weights-only unpickling of DeepSpeed's checkpoint pickles.

DeepSpeed's files are pickles and DeepSpeed 0.19 loads them with ``torch.load(weights_only=False)``;
inside :func:`safe_torch_load` every ``torch.load`` runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` (the
safe unpickler, no arbitrary code) and an explicit allow-list of DeepSpeed's plain data classes; our
own checkpoint files are JSON and safetensors.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .store import CheckpointError

__all__ = ["safe_torch_load"]


def _deepspeed_safe_globals() -> list:
    """Plain data classes DeepSpeed 0.19 stores in its checkpoint pickles (no code runs to restore them)."""
    out = []
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out.append(ZeroStageEnum)
    with contextlib.suppress(ImportError):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out += [LossScaler, DynamicLossScaler]
    with contextlib.suppress(ImportError):
        from deepspeed.utils.tensor_fragment import fragment_address

        out.append(fragment_address)
    return out


@contextlib.contextmanager
def safe_torch_load():
    """Every ``torch.load`` inside runs the weights-only unpickler, even where the caller (DeepSpeed)
    passes ``weights_only=False``; DeepSpeed's data classes are allow-listed."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    except Exception as e:
        import pickle

        if isinstance(e, pickle.UnpicklingError):
            raise CheckpointError(f"refused to unpickle a checkpoint object outside the allow-list: {e}") from None
        raise
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved
