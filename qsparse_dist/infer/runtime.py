"""Load an exported Hugging Face directory (``qsparse-dist export --format hf``) for decoding on one
GPU or the CPU, without transformers' modeling code and without remote code.

The directory's ``config.json`` (``llama`` / ``qwen2`` / ``mixtral`` / ``qsparse``) is mapped back to the
project's :class:`ModelConfig` / :class:`SparsityConfig` and its tensors to the reference layout
(:mod:`qsparse_dist.export.hf_mapping`); the model is the reference :class:`QSparseGPT` — whose
KV-cache forward the decoder uses — with every projection replaced by an inference linear:

* the **sparse path**: ``y = prepare_input(x) · W_effᵀ`` — the recipe's top-K / N:M mask and int8
  quantization of the input from :mod:`qsparse_dist.ops`, with ``W_eff`` the weight the training
  forward multiplies with, computed ONCE at load (BitNet: ``s · W_q``, from the packed codes when the
  export is packed) instead of re-quantized at every call;
* a **backend** per projection, chosen from the registry of :mod:`.backends`: a factory
  ``(recipe, W_eff, bias, packed) -> nn.Module | None``.  ``torch`` (:mod:`.backends.torch_backend`,
  above) is always there; ``kernels`` (:mod:`.backends.kernels`: sparse GEMV over the kept features,
  2-bit ternary GEMV, from :mod:`qsparse_dist.kernels`) falls back to ``torch`` for any projection it
  returns ``None`` for.  :func:`register_linear_backend` adds others.  ``backend="auto"`` = ``kernels``
  on CUDA when Triton is installed, else ``torch``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config.schema import ModelConfig, SparsityConfig
from ..export.errors import ExportError
from ..ops import PackedTernary
from .backends import LINEAR_BACKENDS, auto_backend, register_linear_backend, torch_linear
from .backends.torch_backend import InferenceLinear

__all__ = [
    "InferenceLinear",
    "LoadedModel",
    "load_model",
    "register_linear_backend",
    "LINEAR_BACKENDS",
    "read_hf_weights",
]


@dataclass
class LoadedModel:
    model: nn.Module  # QSparseGPT with inference linears
    model_config: ModelConfig
    sparsity: SparsityConfig
    arch: str
    tokenizer: object | None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    backend: str = "torch"
    from_training: bool = False  # exported by qsparse-dist (documents were packed as [tokens, EOS])

    def set_track_sparsity(self, on: bool = True) -> None:
        for m in self.model.modules():
            if isinstance(m, InferenceLinear):
                m.track_sparsity, m.zero_sum, m.calls = on, 0.0, 0

    def measured_sparsity(self) -> dict[str, float]:
        """Mean zero fraction of the linear inputs since tracking was switched on, by projection."""
        from ..config.shapes import projection_of_module

        acc: dict[str, list[float]] = {}
        for name, m in self.model.named_modules():
            if isinstance(m, InferenceLinear) and m.calls:
                acc.setdefault(projection_of_module(name), []).append(m.zero_sum / m.calls)
        return {k: sum(v) / len(v) for k, v in acc.items()}


def read_hf_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ExportError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (not an HF export)")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        if not (model_dir / f).is_file():
            raise ExportError(f"{model_dir}: weight shard {f} listed in the index is missing")
        out.update(load_file(str(model_dir / f)))
    return out


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ExportError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda requested but CUDA is not available")
    return dev


def _resolve_dtype(dtype: str, saved: str | None, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype == "auto":
        return table.get(saved or "float32", torch.float32) if device.type == "cuda" else torch.float32
    if dtype not in table:
        raise ExportError(f"--dtype must be auto or one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


def load_model(model_dir: str | Path, *, device: str = "auto", dtype: str = "auto", backend: str = "auto",
               load_tokenizer: bool = True) -> LoadedModel:
    """Load an exported HF directory as a decoding-ready reference model (see the module doc)."""
    from ..export.hf_mapping import configs_from_hf, hf_to_reference
    from ..export.layout import validate_reference_state_dict
    from ..layers import SparseLinear
    from ..model.reference import QSparseGPT, rope_cache

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"--model {model_dir}: no config.json (expected a directory written by `qsparse-dist export --format hf`)")
    cfg_json = json.loads((model_dir / "config.json").read_text())
    m, s, arch, packed = configs_from_hf(cfg_json)
    dev = _resolve_device(device)
    saved = cfg_json.get("dtype") or cfg_json.get("torch_dtype")
    torch_dtype = _resolve_dtype(dtype, saved, dev)
    if backend == "auto":
        backend = auto_backend(dev)
    if backend not in LINEAR_BACKENDS:
        raise ExportError(f"--backend must be auto or one of {sorted(LINEAR_BACKENDS)}, got {backend!r}")

    hf = read_hf_weights(model_dir)
    sd, prequantized = hf_to_reference(hf, m, arch)
    validate_reference_state_dict(sd, m, s, source=str(model_dir))
    with torch.device("meta"):
        model = QSparseGPT(m, s)
    model.load_state_dict({k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True, assign=True)
    cos, sin = rope_cache(m.seq_length, m.head_dim, m.rope_theta)
    model.register_buffer("rope_cos", cos, persistent=False)
    model.register_buffer("rope_sin", sin, persistent=False)
    _swap_linears(model, sd, prequantized, hf, backend, torch_dtype, SparseLinear)
    model = model.to(dev).eval()
    model.requires_grad_(False)

    tok, eos, bos = None, [], None
    gen_path = model_dir / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    e = gen.get("eos_token_id", cfg_json.get("eos_token_id"))
    eos = [e] if isinstance(e, int) else list(e or [])
    bos = gen.get("bos_token_id", cfg_json.get("bos_token_id"))
    if load_tokenizer and (model_dir / "tokenizer_config.json").is_file():
        tok = _load_tokenizer(model_dir)
        if not eos and tok.eos_token_id is not None:
            eos = [tok.eos_token_id]
    return LoadedModel(model, m, s, arch, tok, eos, bos, dev, torch_dtype, backend,
                       from_training=(model_dir / "qsparse_export.json").is_file())


def _load_tokenizer(model_dir: Path):
    """AutoTokenizer without running remote code (the runtime never needs the modeling files)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "model of type qsparse …" config warning: only the tokenizer is used
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)


def _swap_linears(model, sd, prequantized, hf, backend, dtype, SparseLinear) -> None:
    """Replace each reference SparseLinear by the backend's inference module (effective weights once)."""
    factory = LINEAR_BACKENDS[backend]
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, SparseLinear):
            continue
        key = f"{name}.weight"
        recipe = mod.recipe
        if key in prequantized:  # packed export: s·W_q already, never re-quantize (the scale would change)
            w_eff = sd[key].float()
            hf_base = ("model." + name) if not name.startswith("lm_head") else name
            packed = PackedTernary(hf[hf_base + ".weight_packed"], hf[hf_base + ".weight_scale"], mod.in_features)
        else:
            w_eff = recipe.weight(sd[key].float()).detach()
            packed = None
        w_eff = w_eff.to(dtype)
        bias = sd.get(f"{name}.bias")
        bias = bias.to(dtype) if bias is not None else None
        new = factory(recipe, w_eff, bias, packed)
        if new is None:
            new = torch_linear(recipe, w_eff, bias, packed)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
