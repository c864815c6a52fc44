"""GGUF export (llama.cpp) with the ``gguf`` package — only for models llama.cpp computes faithfully.

Supported (:func:`gguf_plan` decides, everything else is refused with the reason):

* **dense** Llama-style (no top-K, no BitNet), SwiGLU FFN → arch ``llama`` (MoE: llama's expert
  tensors ``ffn_{gate,up,down}_exps`` + ``ffn_gate_inp``, softmax → top-k → renormalise = our routing),
  with QKV biases → arch ``qwen2``.  Tensor types: F32, F16, BF16 or Q8_0 (``gguf`` 0.19's numpy
  quantizer implements these; 1-D norms stay F32, the MoE router F32).
* **BitNet** (ternary weights, no top-K), SwiGLU → arch ``llama`` with the projections as TQ2_0
  (2-bit ternary, one fp16 scale per 256 weights; our per-tensor absmean-scaled ``s·W_q`` is exact in
  it up to the fp16 rounding of ``s``) or TQ1_0, F16, F32.  llama.cpp quantizes the activations of a
  TQ2_0 matmul per 256-value block (Q8_K) rather than per token (our absmax int8), so its outputs are
  within that quantization error of ours, not bit-equal.  llama.cpp's own ``bitnet`` arch adds
  sub-norms our model does not have, so it is not used.

Refused: top-K activations (Q-Sparse, block Q-Sparse, BitNet+Q-Sparse — llama.cpp has no activation
sparsification, dropping it changes the outputs), ReLU²GLU / dReLU FFNs (llama/qwen2 FFNs are SiLU-gated),
MoE with BitNet, a model without a SentencePiece tokenizer.

Layout notes: llama.cpp's ``llama`` arch applies RoPE to interleaved pairs, so ``attn_q``/``attn_k`` rows
are permuted exactly as llama.cpp's ``convert_hf_to_gguf.py`` does for Llama (``qwen2`` uses NEOX
rotate-half RoPE like ours: no permutation).  GGUF ``ne`` order is the reverse of the numpy shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config.shapes import ffn_width
from .consolidated import Consolidated
from .errors import ExportError, UnsupportedExportError
from .layout import ModelKind, model_kind

__all__ = ["export_gguf", "gguf_plan", "GGUFPlan", "llama_permute", "llama_unpermute", "padded_vocab", "QTYPES"]

QTYPES = ("auto", "f32", "f16", "bf16", "q8_0", "tq2_0", "tq1_0")
_FLOAT_Q = ("f32", "f16", "bf16")


@dataclass(frozen=True)
class GGUFPlan:
    arch: str  # llama | qwen2
    qtype: str  # type of the 2-D projection weights
    permute_qk: bool


def gguf_plan(kind: ModelKind, qtype: str = "auto") -> GGUFPlan:
    """Check that llama.cpp reproduces this model and choose arch + weight type, or raise."""
    if qtype not in QTYPES:
        raise ExportError(f"--gguf-type must be one of {QTYPES}, got {qtype!r}")
    if kind.uses_topk:
        raise UnsupportedExportError(
            f"GGUF cannot represent this {kind.describe()} model: it sparsifies activations with top-K "
            "(sparsity.* > 0), which llama.cpp does not implement — its outputs would differ. "
            "Export with --format hf instead (remote code runs the top-K)."
        )
    if kind.activation != "swiglu":
        raise UnsupportedExportError(
            f"GGUF cannot represent ffn_activation={kind.activation}: llama.cpp's llama/qwen2 FFN is "
            "silu(gate)·up (SwiGLU). Export with --format hf instead."
        )
    if kind.ternary and kind.moe:
        raise UnsupportedExportError("GGUF export of a BitNet MoE model is not supported; use --format hf")
    if kind.qkv_bias and kind.moe:
        raise UnsupportedExportError("GGUF export of an MoE model with QKV biases is not supported; use --format hf")
    arch = "qwen2" if kind.qkv_bias else "llama"
    if qtype == "auto":
        qtype = "tq2_0" if kind.ternary else "f16"
    if qtype in ("tq2_0", "tq1_0") and not kind.ternary:
        raise UnsupportedExportError(
            f"--gguf-type {qtype} is for ternary (BitNet) weights; this model is {kind.describe()} "
            "(use f16, bf16, q8_0 or f32)"
        )
    return GGUFPlan(arch, qtype, permute_qk=arch == "llama")


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half → llama.cpp's interleaved RoPE row order (``convert_hf_to_gguf.py``'s ``permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`llama_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(ckpt: Consolidated, plan: GGUFPlan) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name → (float32 array in numpy [out, in] order, type)."""
    from ..ops import LinearRecipe, pack_ternary_weight

    m, s = ckpt.config.model, ckpt.config.sparsity
    sd = ckpt.state_dict
    nh, ng, hd = m.num_attention_heads, m.query_groups, m.head_dim
    ternary = LinearRecipe(kind=s.linear).quantized
    proj_q = plan.qtype
    big_q = "f16" if proj_q in ("tq2_0", "tq1_0") else proj_q  # embeddings / output head stay float

    def eff(w: torch.Tensor) -> torch.Tensor:
        """The weight the model multiplies with (BitNet: the de-quantized ternary s·W_q)."""
        if not ternary:
            return w.float()
        return pack_ternary_weight(w.float()).dequantize()  # the ops' one ternary-code rule

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    out: dict[str, tuple[np.ndarray, str]] = {"token_embd.weight": (arr(sd["embed.weight"]), big_q),
                                              "output_norm.weight": (arr(sd["final_norm.weight"]), "f32")}
    if "lm_head.weight" in sd:
        out["output.weight"] = (arr(sd["lm_head.weight"]), big_q)
    for i in range(m.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        out[b + "attn_norm.weight"] = (arr(sd[p + "attn_norm.weight"]), "f32")
        out[b + "ffn_norm.weight"] = (arr(sd[p + "ffn_norm.weight"]), "f32")
        q, k, v = eff(sd[p + "attn.qkv.weight"]).split([nh * hd, ng * hd, ng * hd])
        if plan.permute_qk:
            q, k = llama_permute(q, nh), llama_permute(k, ng)
        out[b + "attn_q.weight"], out[b + "attn_k.weight"] = (arr(q), proj_q), (arr(k), proj_q)
        out[b + "attn_v.weight"] = (arr(v), proj_q)
        if p + "attn.qkv.bias" in sd:
            qb, kb, vb = sd[p + "attn.qkv.bias"].float().split([nh * hd, ng * hd, ng * hd])
            for n, t in (("attn_q", qb), ("attn_k", kb), ("attn_v", vb)):
                out[f"{b}{n}.bias"] = (arr(t), "f32")
        out[b + "attn_output.weight"] = (arr(eff(sd[p + "attn.out.weight"])), proj_q)
        if m.moe is None:
            gate, up = eff(sd[p + "ffn.fc1.weight"]).chunk(2)
            out[b + "ffn_gate.weight"], out[b + "ffn_up.weight"] = (arr(gate), proj_q), (arr(up), proj_q)
            out[b + "ffn_down.weight"] = (arr(eff(sd[p + "ffn.fc2.weight"])), proj_q)
            continue
        out[b + "ffn_gate_inp.weight"] = (arr(sd[p + "ffn.router.weight"]), "f32")
        fc1 = [sd[f"{p}ffn.experts.{e}.fc1.weight"].float().chunk(2) for e in range(m.moe.num_experts)]
        out[b + "ffn_gate_exps.weight"] = (arr(torch.stack([g for g, _ in fc1])), proj_q)
        out[b + "ffn_up_exps.weight"] = (arr(torch.stack([u for _, u in fc1])), proj_q)
        down = [sd[f"{p}ffn.experts.{e}.fc2.weight"].float() for e in range(m.moe.num_experts)]
        out[b + "ffn_down_exps.weight"] = (arr(torch.stack(down)), proj_q)
    return out


def _encode(name: str, a: np.ndarray, qtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == "f32":
        return a.astype(np.float32), None
    if qtype == "f16":
        return a.astype(np.float16), None
    enum = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "tq2_0": Q.TQ2_0, "tq1_0": Q.TQ1_0}[qtype]
    block = quants.GGML_QUANT_SIZES[enum][0]
    if a.shape[-1] % block:
        raise UnsupportedExportError(
            f"{name}: input dim {a.shape[-1]} is not a multiple of {qtype.upper()}'s block of {block} values; "
            f"choose another --gguf-type (f16 / q8_0 need 1 / 32) or a model whose dims are multiples of {block}"
        )
    return quants.quantize(a.astype(np.float32), enum), enum


def padded_vocab(pieces: list[str], scores: list[float], types: list[int], rows: int):
    """The token list sized to the embedding's ``rows``: training rounds ``model.vocab_size`` up to a
    multiple of TP (509 pieces, TP=2 → 510 rows) and llama.cpp sizes ``token_embd`` from the token count,
    so the extra rows get tokens ``[PAD{id}]`` of type UNUSED with score -10000, as llama.cpp's
    ``convert_hf_to_gguf.py`` writes them."""
    if len(pieces) > rows:
        raise ExportError(f"the tokenizer has {len(pieces)} pieces but the model only {rows} embedding rows")
    extra = range(len(pieces), rows)
    unused = 5  # gguf.TokenType.UNUSED (= SentencePiece's UNUSED)
    return ([*pieces, *(f"[PAD{i}]" for i in extra)], [*scores, *(-10000.0 for _ in extra)],
            [*types, *(unused for _ in extra)])


def _add_vocab(w, v, special: dict[str, int], rows: int) -> None:
    """``tokenizer.ggml.*`` from the SentencePiece vocabulary ``v`` (:class:`~.tokenizer.SpVocab`)."""
    norm = v.proto.normalizer_spec
    pieces, scores, types = padded_vocab(v.pieces, v.scores, v.types, rows)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)  # SentencePiece's piece types are GGUF's TokenType values (1..6)
    for name, i in (("bos", v.bos_id), ("eos", special.get("eos", v.eos_id)), ("unk", v.unk_id), ("pad", v.pad_id)):
        if i is not None and i >= 0:
            getattr(w, f"add_{name}_token_id")(int(i))
    w.add_add_bos_token(False)  # training packs documents as [tokens, EOS] without BOS
    w.add_add_eos_token(False)
    w.add_add_space_prefix(bool(norm.add_dummy_prefix))


def export_gguf(
    ckpt: Consolidated,
    out: str | Path,
    *,
    qtype: str = "auto",
    overwrite: bool = False,
) -> Path:
    """Write ``ckpt`` as one GGUF file.  ``out``: a ``.gguf`` path, or a directory (→ ``model-<type>.gguf``)."""
    import gguf

    m, s = ckpt.config.model, ckpt.config.sparsity
    kind = model_kind(m, s)
    plan = gguf_plan(kind, qtype)
    if ckpt.tokenizer_file is None or not Path(ckpt.tokenizer_file).is_file():
        raise UnsupportedExportError(
            "GGUF export needs the run's SentencePiece tokenizer (tokenizer.model in the checkpoint); "
            f"{ckpt.source} has {'a Hugging Face tokenizer folder' if ckpt.tokenizer_file else 'none'}"
        )
    out = Path(out)
    path = out if out.suffix == ".gguf" else out / f"model-{plan.qtype}.gguf"
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists (choose another --out)")
    path.parent.mkdir(parents=True, exist_ok=True)
    from .tokenizer import sentencepiece_vocab

    vocab = sentencepiece_vocab(ckpt.tokenizer_file)
    rows = int(ckpt.state_dict["embed.weight"].shape[0])
    padded_vocab(vocab.pieces, vocab.scores, vocab.types, rows)  # fail before writing
    tensors = _gguf_tensors(ckpt, plan)
    encoded = {name: _encode(name, a, q) for name, (a, q) in tensors.items()}  # fail before writing

    w = gguf.GGUFWriter(str(path), plan.arch)
    w.add_name(f"qsparse-dist {kind.describe()}")
    w.add_context_length(m.seq_length)
    w.add_embedding_length(m.hidden_size)
    w.add_block_count(m.num_layers)
    w.add_feed_forward_length(ffn_width(m))
    w.add_head_count(m.num_attention_heads)
    w.add_head_count_kv(m.query_groups)
    w.add_rope_dimension_count(m.head_dim)
    w.add_rope_freq_base(m.rope_theta)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_vocab_size(m.vocab_size)
    if m.moe is not None:
        w.add_expert_count(m.moe.num_experts)
        w.add_expert_used_count(m.moe.router_topk)
        w.add_expert_feed_forward_length(ffn_width(m))
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
             "tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}[plan.qtype]
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_vocab(w, vocab, ckpt.special_tokens, rows)
    for name, (data, raw) in encoded.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
