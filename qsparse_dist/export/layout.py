"""The reference state-dict layout (``qsparse_dist/model/reference.py`` docstring) as data: expected
tensor names and shapes for a config, validation of a consolidated state dict, and a description of
what math a model runs (which decides the formats it can be exported to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config.schema import PROJECTIONS, ModelConfig, SparsityConfig
from .errors import CheckpointError

__all__ = ["ModelKind", "model_kind", "expected_shapes", "validate_reference_state_dict"]


@dataclass(frozen=True)
class ModelKind:
    """What the model computes, summarised for the exporters."""

    linear: str  # SparsityConfig.linear
    uses_topk: bool  # some projection sparsifies its input (top-K or N:M)
    ternary: bool  # BitNet b1.58 weights + int8 activations
    moe: bool
    activation: str  # relu2glu | drelu | swiglu
    qkv_bias: bool

    @property
    def plain_dense(self) -> bool:
        """No top-K and no quantization anywhere: the model is an ordinary Llama / Mixtral."""
        return not self.uses_topk and not self.ternary

    def describe(self) -> str:
        parts = [self.linear]
        if self.moe:
            parts.append("MoE")
        parts.append(self.activation)
        return " ".join(parts)


def model_kind(model: ModelConfig, sparsity: SparsityConfig) -> ModelKind:
    recipes = [sparsity.recipe(p) for p in PROJECTIONS]
    return ModelKind(
        linear=sparsity.linear,
        uses_topk=any(r.uses_topk for r in recipes),
        ternary=any(r.quantized for r in recipes),
        moe=model.moe is not None,
        activation=model.ffn_activation,
        qkv_bias=bool(getattr(model, "qkv_bias", False)),
    )


def expected_shapes(model: ModelConfig, sparsity: SparsityConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor of the reference model for this config (built on the meta
    device, so no memory is allocated)."""
    from ..model.reference import QSparseGPT

    with torch.device("meta"):
        ref = QSparseGPT(model, sparsity)
    return {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def validate_reference_state_dict(
    state_dict: dict[str, torch.Tensor],
    model: ModelConfig,
    sparsity: SparsityConfig,
    source: str = "checkpoint",
    check_finite: bool = True,
) -> None:
    """Raise :class:`CheckpointError` listing missing, unexpected, mis-shaped or non-finite tensors."""
    want = expected_shapes(model, sparsity)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    wrong = sorted(
        f"{k}: {tuple(state_dict[k].shape)} (config expects {want[k]})"
        for k in set(want) & set(state_dict)
        if tuple(state_dict[k].shape) != want[k]
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_abbrev(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_abbrev(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_abbrev(wrong)}")
    if not problems and check_finite:
        bad = sorted(k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all())
        if bad:
            problems.append(f"non-finite values (NaN/Inf) in: {_abbrev(bad)}")
    if problems:
        raise CheckpointError(f"{source} does not match its model config: " + "; ".join(problems))


def _abbrev(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", … (+{len(items) - n} more)" if len(items) > n else "")
