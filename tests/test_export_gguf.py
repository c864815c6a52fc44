"""GGUF export: tensors read back with the ``gguf`` reader equal the source within the format's
quantization error; transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``, an
independent reader that undoes the RoPE permutation itself) computes the source model's logits; the
token list covers every embedding row (``[PAD{id}]`` padding, as llama.cpp's converter writes it);
transformers' GGUF tokenizer encodes like SentencePiece except for one documented leading-space rule;
models llama.cpp cannot reproduce are refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qsparse_dist.export import UnsupportedExportError, export_gguf, export_hf, load_checkpoint
from qsparse_dist.export.gguf_writer import llama_permute, llama_unpermute
from tests.export_fixtures import make_checkpoint, make_config, reference_model, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


TOK_PIECES = 509  # issue 14 (4d): a 509-piece tokenizer trained with TP=2 gives 510 embedding rows
TP2_ROWS = -(-TOK_PIECES // 2) * 2  # train/loop.py rounds model.vocab_size up to a multiple of TP


@pytest.fixture(scope="module")
def tokenizer509(tmp_path_factory):
    from qsparse_dist.data.tokenizer import train_sentencepiece
    from tests.corpus import corpus_text

    out = tmp_path_factory.mktemp("tok509")
    train_sentencepiece(corpus_text(120_000).split("\n\n"), TOK_PIECES, out)
    return out / "tokenizer.model"


def hf_from_gguf(path):
    """The model as transformers' GGUF loader builds it (needs ``accelerate``, in the export extra)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


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
    """Inverse of the writer's mapping (test-side) for the per-tensor error bounds, and for the logits
    of the MoE file, which transformers' GGUF loader cannot build (it reads llama-arch expert tensors
    as a dense Llama)."""
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


def _assert_within_format_error(got: dict, want: dict, qtype: str) -> None:
    """Every tensor of ``want`` is in ``got`` within the GGUF type's rounding; F32 and 1-D exact."""
    assert set(got) == set(want)
    for k, v in want.items():
        err = (got[k].float() - v.float()).abs().max().item()
        if qtype == "f32" or v.dim() == 1:  # F32 files and all 1-D tensors (kept F32) are exact
            assert err == 0.0, k
        elif qtype == "f16":
            assert err <= v.abs().max().item() * 2**-11, k
        else:  # Q8_0: per 32-block scale d = absmax/127: error <= d/2 + 127·d·2^-11 (fp16 d) < 0.6·d
            assert err <= v.abs().max().item() / 127 * 0.6, k


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
    assert (tensors["blk.0.attn_q.weight"][1], tensors["token_embd.weight"][1]) == (qtype.upper(),) * 2
    tokens = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    want = reference_model(ckpt)(tokens).detach()
    if cfg.model.moe is None:
        # transformers reads the file (its own un-permutation, dequantization and naming); every tensor
        # must equal the one transformers reads from our HF export (parity-tested in test_export_hf.py)
        hf = hf_from_gguf(path)
        assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(export_hf(ckpt, tmp_path / "hf", dtype="float32").out_dir,
                                                   dtype=torch.float32)
        _assert_within_format_error(hf.state_dict(), ref.state_dict(), qtype)
        with torch.no_grad():
            got = hf(tokens).logits
    else:  # transformers cannot build a llama-arch MoE file: the test-side inverse of the mapping
        sd = gguf_to_reference(tensors, cfg, arch)
        _assert_within_format_error(sd, ckpt.state_dict, qtype)
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


@pytest.mark.parametrize("kind,kw,qtype", [
    ("dense", {"act": "swiglu"}, "f32"),
    ("bitnet", {"act": "swiglu", "hidden": 256, "ffn": 256}, "tq2_0"),
])
def test_gguf_token_list_covers_every_embedding_row(kind, kw, qtype, tmp_path, tokenizer509):
    """llama.cpp sizes ``token_embd`` from the token count and rejects a shorter list (issue 14, 4d)."""
    import gguf
    import sentencepiece as spm
    from gguf import GGUFReader

    cfg = make_config(kind, vocab=TP2_ROWS, **kw)
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer509, scale=5.0))
    path = export_gguf(ckpt, tmp_path / "out", qtype=qtype)
    r = GGUFReader(str(path))
    embd = next(t for t in r.tensors if t.name == "token_embd.weight")
    rows = int(embd.shape[1])  # GGUF ne order: [hidden, rows]
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    assert rows == TP2_ROWS == len(tokens) == len(types) == len(scores) == 510
    assert r.fields["llama.vocab_size"].contents() == rows
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer509))
    assert sp.get_piece_size() == TOK_PIECES
    assert tokens[:TOK_PIECES] == [sp.id_to_piece(i) for i in range(TOK_PIECES)]
    assert tokens[TOK_PIECES:] == ["[PAD509]"]
    assert types[TOK_PIECES:] == [int(gguf.TokenType.UNUSED)] and scores[TOK_PIECES] == -10000.0
    if qtype == "f32":  # and a llama.cpp-convention reader builds the model from it
        hf = hf_from_gguf(path)
        assert hf.config.vocab_size == rows
        ids = torch.randint(0, rows, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert (hf(ids).logits - reference_model(ckpt)(ids)).abs().max().item() <= 1e-5


def test_gguf_tokenizer_in_transformers(tmp_path, tokenizer509):
    """transformers' GGUF tokenizer equals SentencePiece except at the very start of a text that begins
    with a space or with a user-defined piece ("\\n" in prepare-data's tokenizers): SentencePiece always
    prepends the dummy "▁" (" x" → "▁▁x", "\\nx" → "▁" "\\n" "x"); transformers' ``Metaspace(prepend_scheme=
    "first")`` prepends it only when the text does not already start with "▁", and splits user-defined
    pieces off as added tokens before that (" x" → "▁x", "\\nx" → "\\n" "x").  The file's metadata is
    SentencePiece's own (``add_space_prefix`` = ``add_dummy_prefix``, piece types as trained), so this
    pins transformers' behaviour, documented in docs/export.md (issue 14, 4f)."""
    import random

    import sentencepiece as spm
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from tests.corpus import corpus_text

    cfg = make_config("dense", act="swiglu", vocab=TP2_ROWS)
    path = export_gguf(load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer509)), tmp_path / "out",
                       qtype="f32")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer509))
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    assert fields["tokenizer.ggml.token_type"].contents()[sp.piece_to_id("\n")] == 4  # USER_DEFINED, as trained
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert tok.tokenize(" x") == ["▁", "x"] and sp.encode(" x", out_type=str) == ["▁▁", "x"]
    assert tok.tokenize("\nx") == ["\n", "x"] and sp.encode("\nx", out_type=str) == ["▁", "\n", "x"]
    text = corpus_text(200_000)
    rng = random.Random(0)
    samples = ["Hello world", "x", " x", "  x", " leading", "a\n\nb  c", "tabs\tand ü", "\n", "\n x", "end  ", "x\n y"]
    samples += [text[i:i + rng.randrange(2, 200)] for i in (rng.randrange(len(text) - 200) for _ in range(150))]
    differ = 0
    for s in samples:
        got, want = tok.encode(s, add_special_tokens=False), sp.encode(s)
        if s.startswith((" ", "\n")):  # one "▁" fewer, at the start, and nothing else differs
            differ += 1
            joined = "".join(sp.encode(s, out_type=str))
            assert joined[0] == "▁" and "".join(tok.convert_ids_to_tokens(got)) == joined[1:], repr(s)
            assert got == (sp.encode(s[1:]) if s[0] == " " else want[1:]), repr(s)
        else:
            assert got == want, repr(s)
    assert differ >= 5 and len(samples) - differ >= 100
