"""GGUF export: tensors read back with the ``gguf`` reader equal the source within the format's
quantization error; a model rebuilt from the GGUF (RoPE permutation undone, experts unstacked)
computes the source model's logits; models llama.cpp cannot reproduce are refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsparse_dist.export import UnsupportedExportError, export_gguf, load_checkpoint
from qsparse_dist.export.gguf_writer import llama_permute, llama_unpermute
from tests.export_fixtures import make_checkpoint, make_config, reference_model, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def read_gguf(path):
    """name → (float32 array in numpy [out, in] order, type name), plus the key/value fields."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[t.name] = (dequantize(t.data, t.tensor_type).reshape(shape), t.tensor_type.name)
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("tokenizer.ggml.tokens") or name.startswith("tokenizer.ggml.scores") or not f.types:
            continue
        v = f.contents()
        fields[name] = v
    return tensors, fields


def gguf_to_reference(tensors, cfg, arch):
    """Inverse of the writer's mapping (test-side), for the logits check."""
    m = cfg.model
    nh, ng = m.num_attention_heads, m.query_groups
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, (v, _) in tensors.items()}
    sd = {"embed.weight": t["token_embd.weight"], "final_norm.weight": t["output_norm.weight"]}
    if "output.weight" in t:
        sd["lm_head.weight"] = t["output.weight"]
    for i in range(m.num_layers):
        b, p = f"blk.{i}.", f"layers.{i}."
        q, k = t[b + "attn_q.weight"], t[b + "attn_k.weight"]
        if arch == "llama":
            q, k = llama_unpermute(q, nh), llama_unpermute(k, ng)
        sd[p + "attn.qkv.weight"] = torch.cat([q, k, t[b + "attn_v.weight"]])
        if b + "attn_q.bias" in t:
            sd[p + "attn.qkv.bias"] = torch.cat([t[b + f"attn_{x}.bias"] for x in "qkv"])
        sd[p + "attn.out.weight"] = t[b + "attn_output.weight"]
        sd[p + "attn_norm.weight"], sd[p + "ffn_norm.weight"] = t[b + "attn_norm.weight"], t[b + "ffn_norm.weight"]
        if m.moe is None:
            sd[p + "ffn.fc1.weight"] = torch.cat([t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]])
            sd[p + "ffn.fc2.weight"] = t[b + "ffn_down.weight"]
        else:
            sd[p + "ffn.router.weight"] = t[b + "ffn_gate_inp.weight"]
            for e in range(m.moe.num_experts):
                sd[f"{p}ffn.experts.{e}.fc1.weight"] = torch.cat([t[b + "ffn_gate_exps.weight"][e], t[b + "ffn_up_exps.weight"][e]])
                sd[f"{p}ffn.experts.{e}.fc2.weight"] = t[b + "ffn_down_exps.weight"][e]
    return sd


def _logits(cfg, sd, tokens):
    from qsparse_dist.model import QSparseGPT

    model = QSparseGPT(cfg.model, cfg.sparsity)
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(tokens)


def test_rope_permutation_is_llama_cpp_interleave():
    # head_dim 4: rotate-half pairs (0,2),(1,3) become interleaved pairs (0,1),(2,3)
    w = torch.arange(8.0).reshape(8, 1)  # 2 heads
    assert llama_permute(w, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    x = torch.randn(24, 5)
    assert torch.equal(llama_unpermute(llama_permute(x, 3), 3), x)


@pytest.mark.parametrize("name,kind,kw,qtype,tol", [
    ("dense_f32", "dense", {"act": "swiglu"}, "f32", 0.0),
    ("dense_f16", "dense", {"act": "swiglu", "tied": True}, "f16", None),
    ("dense_q8_0", "dense", {"act": "swiglu"}, "q8_0", None),
    ("qwen2_bias_f32", "dense", {"act": "swiglu", "qkv_bias": True}, "f32", 0.0),
    ("moe_f32", "dense", {"act": "swiglu", "moe": True}, "f32", 0.0),
])
def test_gguf_round_trip_dense(name, kind, kw, qtype, tol, tmp_path, tokenizer):
    cfg = make_config(kind, **kw)
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer))
    path = export_gguf(ckpt, tmp_path / "out", qtype=qtype)
    tensors, fields = read_gguf(path)
    arch = "qwen2" if kw.get("qkv_bias") else "llama"
    assert fields["general.architecture"] == arch
    assert fields[f"{arch}.block_count"] == cfg.model.num_layers
    assert fields[f"{arch}.attention.head_count_kv"] == cfg.model.query_groups
    assert fields["tokenizer.ggml.eos_token_id"] == 2
    sd = gguf_to_reference(tensors, cfg, arch)
    src = ckpt.state_dict
    assert set(sd) == set(src)
    for k, v in src.items():
        err = (sd[k] - v.float()).abs().max().item()
        if tol == 0.0 or v.dim() == 1:  # F32 files and all 1-D tensors are exact
            assert err == 0.0, k
        elif qtype == "f16":
            assert err <= v.abs().max().item() * 2**-11, k
        else:  # Q8_0: per 32-block scale d = absmax/127: error <= d/2 + 127·d·2^-11 (fp16 d) < 0.6·d
            assert err <= v.abs().max().item() / 127 * 0.6, k
            assert tensors["blk.0.attn_q.weight"][1] == "Q8_0"
    tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    want = reference_model(ckpt)(tokens).detach()
    got = _logits(cfg, sd, tokens)
    bound = 1e-5 if tol == 0.0 else 5e-2
    assert (got - want).abs().max().item() <= bound


@pytest.mark.parametrize("qtype", ["auto", "tq1_0"])
def test_gguf_bitnet_ternary_types(qtype, tmp_path, tokenizer):
    from qsparse_dist.ops import quantize_weight_ternary

    cfg = make_config("bitnet", act="swiglu", hidden=256, ffn=256)  # TQ blocks hold 256 weights
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer))
    path = export_gguf(ckpt, tmp_path / "out", qtype=qtype)  # auto → tq2_0
    want = "TQ2_0" if qtype == "auto" else "TQ1_0"
    assert path.name == f"model-{want.lower()}.gguf"
    tensors, fields = read_gguf(path)
    assert tensors["blk.0.ffn_down.weight"][1] == want and tensors["token_embd.weight"][1] == "F16"
    sd = gguf_to_reference(tensors, cfg, "llama")
    for k, v in ckpt.state_dict.items():
        if k.endswith(("qkv.weight", "out.weight", "fc1.weight", "fc2.weight")):
            w_q, s = quantize_weight_ternary(v)
            deq = w_q.float() * s
            # ternary codes exact; the scale is stored as fp16 per 256-block
            assert (sd[k] - deq).abs().max().item() <= s.item() * 2**-11, k
            assert torch.equal(torch.sign(sd[k]), w_q.float()), k


@pytest.mark.parametrize("kind,kw,qtype,match", [
    ("qsparse", {}, "auto", "top-K"),
    ("block_qsparse", {}, "auto", "top-K"),
    ("bitnet_qsparse", {}, "auto", "top-K"),
    ("dense", {}, "auto", "ffn_activation=relu2glu"),
    ("dense", {"act": "drelu"}, "auto", "ffn_activation=drelu"),
    ("dense", {"act": "swiglu"}, "tq2_0", "ternary"),
    ("bitnet", {"act": "swiglu"}, "tq2_0", "not a multiple of TQ2_0's block of 256"),
])
def test_gguf_refuses_what_llama_cpp_cannot_run(kind, kw, qtype, match, tmp_path, tokenizer):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config(kind, **kw), tokenizer))
    with pytest.raises(UnsupportedExportError, match=match):
        export_gguf(ckpt, tmp_path / "out", qtype=qtype)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
