"""Export a consolidated checkpoint as a Hugging Face model directory.

Which architecture (see :mod:`.hf_mapping`):

=====================================  ===============================================================
model                                  written as
=====================================  ===============================================================
dense (no top-K, no BitNet), swiglu /  ``LlamaForCausalLM`` (``Qwen2ForCausalLM`` with QKV biases),
relu2glu                               ``MixtralForCausalLM`` for MoE — no remote code
anything else (Q-Sparse, block         ``QSparseForCausalLM``: ``configuration_qsparse.py`` /
Q-Sparse, BitNet, BitNet+Q-Sparse,     ``modeling_qsparse.py`` registered through ``auto_map`` plus
dReLU, …)                              copies of ``model/blocks.py`` and the ``ops`` modules they import
=====================================  ===============================================================

Files: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
past ``max_shard_size``), ``config.json``, ``generation_config.json``, the tokenizer
(``tokenizer.json`` / ``tokenizer_config.json`` converted from the run's SentencePiece model, which is
copied too as ``tokenizer.model``), and ``qsparse_export.json`` (provenance: source checkpoint, step,
resolved run config, sha256 of the copied source files).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import dump_config
from .consolidated import Consolidated
from .errors import ExportError, UnsupportedExportError
from .hf_mapping import HF_ACT, TERNARY_PROJECTIONS, hf_config_dict, reference_to_hf
from .layout import ModelKind, model_kind

__all__ = ["export_hf", "choose_hf_arch", "parse_dtype", "HFExport", "REMOTE_DIR", "OPS_DIR"]

REMOTE_DIR = Path(__file__).parent / "hf_remote"
OPS_DIR = Path(__file__).resolve().parents[1] / "ops"
MODEL_DIR = Path(__file__).resolve().parents[1] / "model"
SOURCE_DIRS = (REMOTE_DIR, MODEL_DIR, OPS_DIR)
"""Where the remote code's sibling imports come from: the templates, the shared blocks, the ops math."""
_ARCH_CLASS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
               "qsparse": "QSparseForCausalLM"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class HFExport:
    out_dir: Path
    arch: str
    dtype: torch.dtype
    packed: bool
    files: list[str]


def parse_dtype(name: str, train_dtype: str = "fp32") -> torch.dtype:
    """``auto`` = the run's ``train.dtype``; else float32|bfloat16|float16 (or fp32|bf16|fp16)."""
    if name == "auto":
        return torch.bfloat16 if train_dtype == "bf16" else torch.float32
    if name not in _DTYPES:
        raise ExportError(f"--dtype must be auto or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def choose_hf_arch(kind: ModelKind) -> str:
    """The stock transformers architecture that computes exactly this model, else ``qsparse``."""
    if not kind.plain_dense or kind.activation not in HF_ACT:
        return "qsparse"
    if kind.moe:
        return "qsparse" if kind.qkv_bias else "mixtral"
    return "qwen2" if kind.qkv_bias else "llama"


def _remote_sources() -> dict[str, Path]:
    """The remote-code files and, following their ``from .x import`` lines, the modules they need:
    the shared torch blocks (``model/blocks.py``) and the ``ops`` math, each copied unchanged."""
    files = {p.name: p for p in (REMOTE_DIR / "configuration_qsparse.py", REMOTE_DIR / "modeling_qsparse.py")}
    todo = list(files.values())
    while todo:
        path = todo.pop()
        text = path.read_text(encoding="utf-8")
        for mod in re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE):
            name = f"{mod}.py"
            if name in files:
                continue
            src = next((d / name for d in SOURCE_DIRS if (d / name).is_file()), None)
            if src is None:
                raise ExportError(f"remote code imports .{mod}, found in none of {[str(d) for d in SOURCE_DIRS]}")
            files[name] = src
            todo.append(src)
    return files


_OUTER_IMPORT = re.compile(r"^([ \t]*)from[ \t]+(\.\.[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]+)", re.MULTILINE)


def _shipped_text(src: Path) -> str:
    """The source of one remote-code file as written into the export: a plain copy (the remote code,
    the shared blocks and the ops), refused if it reaches outside the export directory (``ops`` never
    imports upward: the Triton kernels register into ``ops.dispatch`` instead)."""
    text = src.read_text(encoding="utf-8")
    if _OUTER_IMPORT.search(text):
        raise ExportError(f"{src}: remote code must import only its siblings (from .x import), not from ..")
    return text


def add_legacy_config_keys(config_json: Path) -> None:
    """Also write the pre-5 names of two renamed ``config.json`` keys, so the oldest supported
    transformers (constraints/oldest-transformers.txt) builds the same model: ``rope_theta`` (transformers
    5 keeps it in ``rope_parameters``; 4.x ignores that and uses its default, 1e6 for Mixtral) and
    ``torch_dtype`` (5: ``dtype``).  transformers 5 prefers the new keys when both are present."""
    cfg = json.loads(config_json.read_text())
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        cfg.setdefault("rope_theta", theta)
    if cfg.get("dtype") is not None:
        cfg.setdefault("torch_dtype", cfg["dtype"])
    config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _save_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: int | str) -> list[str]:
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
    written = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        written.append("model.safetensors.index.json")
    return written


def _special_ids(ckpt: Consolidated) -> dict[str, int]:
    ids = dict(ckpt.special_tokens)
    if ckpt.tokenizer_file is not None and Path(ckpt.tokenizer_file).is_file():
        from .tokenizer import sentencepiece_vocab

        v = sentencepiece_vocab(ckpt.tokenizer_file)
        for name, i in (("bos", v.bos_id), ("eos", v.eos_id), ("pad", v.pad_id)):
            if i >= 0:
                ids.setdefault(name, i)
    return ids


def export_hf(
    ckpt: Consolidated,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    pack_ternary: bool = False,
    max_shard_size: int | str = "2GB",
    overwrite: bool = False,
) -> HFExport:
    """Write ``ckpt`` as a Hugging Face model directory (see the module doc)."""
    cfg = ckpt.config
    m, s = cfg.model, cfg.sparsity
    kind = model_kind(m, s)
    arch = choose_hf_arch(kind)
    if pack_ternary and not kind.ternary:
        raise UnsupportedExportError(
            f"--pack-ternary needs a BitNet model (sparsity.linear bitnet|bitnet_qsparse); this one is {s.linear}"
        )
    torch_dtype = parse_dtype(dtype, cfg.train.dtype)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"--out {out} exists and is not empty (choose a new directory)")
    out.mkdir(parents=True, exist_ok=True)

    sd = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    if pack_ternary:  # quantize from the full-precision weights, not from a down-cast copy
        full = ckpt.state_dict
        sd = {k: (full[k] if TERNARY_PROJECTIONS.search(k) else v) for k, v in sd.items()}
    tensors = reference_to_hf(sd, m, arch, packed=pack_ternary)
    files = _save_weights(tensors, out, max_shard_size)

    special = _special_ids(ckpt)
    hf_kwargs = hf_config_dict(m, s, arch, packed=pack_ternary)
    hf_kwargs.update(bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad"))
    if arch == "qsparse":
        import importlib.util

        spec = importlib.util.spec_from_file_location("_qsd_configuration_qsparse", REMOTE_DIR / "configuration_qsparse.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        hf_cfg = mod.QSparseConfig(**hf_kwargs)
        hf_cfg.auto_map = {"AutoConfig": "configuration_qsparse.QSparseConfig",
                           "AutoModelForCausalLM": "modeling_qsparse.QSparseForCausalLM"}
        sources = _remote_sources()
        for name, src in sources.items():
            (out / name).write_text(_shipped_text(src), encoding="utf-8")
        files += sorted(sources)
    else:
        import transformers

        hf_cfg = getattr(transformers, {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mixtral": "MixtralConfig"}[arch])(**hf_kwargs)
    hf_cfg.architectures = [_ARCH_CLASS[arch]]
    hf_cfg.dtype = torch_dtype
    hf_cfg.save_pretrained(out)
    add_legacy_config_keys(out / "config.json")
    files.append("config.json")

    from transformers import GenerationConfig

    GenerationConfig(bos_token_id=special.get("bos"), eos_token_id=special.get("eos"),
                     pad_token_id=special.get("pad")).save_pretrained(out)
    files.append("generation_config.json")

    if ckpt.tokenizer_file is not None and Path(ckpt.tokenizer_file).is_dir():  # already a HF tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(ckpt.tokenizer_file)).save_pretrained(out)
        files += ["tokenizer_config.json"]
    elif ckpt.tokenizer_file is not None:
        from .tokenizer import hf_tokenizer_from_sentencepiece

        tok = hf_tokenizer_from_sentencepiece(ckpt.tokenizer_file)
        tok.model_max_length = m.seq_length
        tok.save_pretrained(out)
        shutil.copyfile(ckpt.tokenizer_file, out / "tokenizer.model")
        files += ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]

    provenance = {
        "format": "qsparse-dist hf export v1",
        "source": str(ckpt.source),
        "source_layout": ckpt.layout,
        "step": ckpt.step,
        "arch": arch,
        "model_kind": kind.describe(),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "ternary_packed": pack_ternary,
        "run_config": dump_config(cfg),
        "sha256": {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in files if n.endswith(".py")},
    }
    (out / "qsparse_export.json").write_text(json.dumps(provenance, indent=2))
    files.append("qsparse_export.json")
    return HFExport(out, arch, torch_dtype, pack_ternary, sorted(set(files)))
