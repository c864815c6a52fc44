"""The packed ternary weight format: 2 bits per BitNet b1.58 weight, 4 weights per byte.

This is the ONE definition shared by export (safetensors / HF checkpoints), the runtime and the
Triton decode kernels (``qsparse_dist.kernels``).

Bit layout (packing runs along the LAST dim of ``w_q``; for a weight ``[N, K]`` that is the input
dim ``K``, so the stored tensor is ``[N, ceil(K/4)]`` uint8)::

    code = w_q + 1                    -1 -> 0b00,  0 -> 0b01,  +1 -> 0b10   (0b11 is invalid)
    byte[..., j] = code[..., 4j] | code[..., 4j+1] << 2 | code[..., 4j+2] << 4 | code[..., 4j+3] << 6

i.e. element ``4j + i`` sits in bits ``[2i, 2i+1]`` of byte ``j`` (lowest element in the lowest
bits).  When ``K`` is not a multiple of 4 the last byte is padded with code ``0b01`` (weight 0), so
a padded byte never changes a dot product.  An all-zero weight packs to bytes ``0x55``.

Scale storage: the BitNet absmean scale ``s_w`` (``qsparse_dist.ops.quantize_weight_ternary``) is
per tensor, kept beside the packed bytes as a separate float32 scalar (shape ``[]``), and the
de-quantized weight is ``W ≈ s_w · unpack_ternary(packed, K)``.  ``K`` (the unpacked length) is part
of the tensor's metadata (the model config gives it); :func:`unpack_ternary` needs it to drop the
padding.

Where codes come from (the only two places, both below): :func:`pack_ternary_weight` quantizes a
*latent* weight with the BitNet absmean rule (export, GGUF, the kernel decoder);
:func:`pack_effective_ternary` recovers the codes of an *effective* weight ``s·W_q`` (the runtime).

Kernel layout: the decode kernels read only the weight rows of the *kept* input features, so they
want the input dim outermost: :func:`to_feature_major` returns ``pack_ternary(w_qᵀ)``, shape
``[K, ceil(N/4)]`` (same bit layout, packed along the outputs ``N``).  It is derived from the
stored form at load time and never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "TERNARY_CODE_OFFSET",
    "PackedTernary",
    "pack_ternary",
    "unpack_ternary",
    "to_feature_major",
    "pack_ternary_weight",
    "pack_effective_ternary",
]

TERNARY_CODE_OFFSET = 1  # code = w_q + 1
_SHIFTS = (0, 2, 4, 6)


def _check_ternary(w_q: torch.Tensor) -> None:
    if not isinstance(w_q, torch.Tensor):
        raise ValueError(f"w_q must be a torch.Tensor, got {type(w_q).__name__}")
    if w_q.dtype != torch.int8:
        raise ValueError(f"w_q must be int8 with values in {{-1, 0, 1}}, got dtype {w_q.dtype}")
    if w_q.dim() == 0:
        raise ValueError("w_q must have at least one dimension (packed along the last)")
    if w_q.numel() and (w_q.min() < -1 or w_q.max() > 1):
        raise ValueError("w_q must hold only -1, 0, 1 (quantize with quantize_weight_ternary first)")


def pack_ternary(w_q: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary ``w_q [..., K]`` into uint8 ``[..., ceil(K/4)]`` (layout in module doc)."""
    _check_ternary(w_q)
    k = w_q.shape[-1]
    pad = (-k) % 4
    code = (w_q.to(torch.int16) + TERNARY_CODE_OFFSET).to(torch.uint8)
    if pad:
        fill = torch.full((*code.shape[:-1], pad), TERNARY_CODE_OFFSET, dtype=torch.uint8, device=code.device)
        code = torch.cat([code, fill], dim=-1)
    code = code.reshape(*code.shape[:-1], -1, 4)
    out = code[..., 0].clone()
    for i in range(1, 4):
        out |= code[..., i] << _SHIFTS[i]
    return out.contiguous()


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: uint8 ``[..., ceil(k/4)]`` -> int8 ``[..., k]`` in {-1, 0, 1}."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed must be a uint8 tensor, got {got}")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if packed.dim() == 0 or packed.shape[-1] != (k + 3) // 4:
        raise ValueError(
            f"packed last dim must be ceil(k/4) = {(k + 3) // 4} for k={k}, got shape {tuple(packed.shape)}"
        )
    codes = torch.stack([(packed >> s) & 3 for s in _SHIFTS], dim=-1)
    if bool((codes == 3).any()):
        raise ValueError("packed holds the invalid code 0b11; not a pack_ternary output")
    w = codes.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.int8) - TERNARY_CODE_OFFSET
    return w.contiguous()


def to_feature_major(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Stored ``[N, ceil(K/4)]`` -> kernel layout ``[K, ceil(N/4)]`` (= ``pack_ternary(w_qᵀ)``)."""
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [N, ceil(K/4)], got shape {tuple(packed.shape)}")
    return pack_ternary(unpack_ternary(packed, k).t().contiguous())


@dataclass(frozen=True)
class PackedTernary:
    """A packed ternary weight: ``W ≈ scale · unpack_ternary(packed, in_features)``."""

    packed: torch.Tensor  # uint8 [out_features, ceil(in_features/4)]
    scale: torch.Tensor  # float32, shape []
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    def unpack(self) -> torch.Tensor:
        """int8 ``[out_features, in_features]`` in {-1, 0, 1}."""
        return unpack_ternary(self.packed, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.unpack().float() * self.scale).to(dtype)


def pack_ternary_weight(w: torch.Tensor, eps: float | None = None) -> PackedTernary:
    """Quantize a latent weight ``[N, K]`` with the BitNet absmean rule and pack it."""
    from .quant import WEIGHT_EPS, quantize_weight_ternary

    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight [out, in], got {getattr(w, 'shape', type(w).__name__)}")
    w_q, s = quantize_weight_ternary(w, WEIGHT_EPS if eps is None else eps)
    return PackedTernary(pack_ternary(w_q), s.reshape(()), w.shape[1])


def pack_effective_ternary(w_eff: torch.Tensor) -> PackedTernary:
    """Recover the codes of an effective BitNet weight ``W_eff = s · W_q`` ``[N, K]`` exactly:
    ``s = max|W_eff|`` (every nonzero entry has magnitude ``s``), ``W_q = clamp(round(W_eff / s), -1, 1)``."""
    if not isinstance(w_eff, torch.Tensor) or w_eff.dim() != 2:
        raise ValueError(f"w_eff must be a 2-D weight [out, in], got {getattr(w_eff, 'shape', type(w_eff).__name__)}")
    scale = w_eff.detach().abs().amax().float()
    w_q = torch.clamp(torch.round(w_eff.detach().float() / scale), -1, 1).to(torch.int8)
    return PackedTernary(pack_ternary(w_q), scale.reshape(()), w_eff.shape[1])
