"""Hugging Face export: exported model logits equal the training (reference) model's for every model
kind, the tokenizer encodes exactly like the run's SentencePiece model, sharding, packing, and clear
errors for corrupt / incomplete / mismatched checkpoints."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from qsparse_dist.export import (
    CheckpointError,
    ExportError,
    UnsupportedExportError,
    export_hf,
    load_checkpoint,
)
from tests.corpus import corpus_text
from tests.export_fixtures import make_checkpoint, make_config, reference_model, train_tokenizer

TOL = 1e-4  # fp32 max abs logit difference allowed by the issue


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def _hf_logits(out, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf, hf(tokens).logits


CASES = {  # name: (sparsity kind, config kwargs, expected HF architecture class)
    "dense": ("dense", {"act": "swiglu"}, "LlamaForCausalLM"),
    "dense_relu2glu_tied": ("dense", {"tied": True}, "LlamaForCausalLM"),
    "dense_qkv_bias": ("dense", {"act": "swiglu", "qkv_bias": True}, "Qwen2ForCausalLM"),
    "qsparse": ("qsparse", {}, "QSparseForCausalLM"),
    "block_qsparse": ("block_qsparse", {}, "QSparseForCausalLM"),
    "bitnet": ("bitnet", {"act": "swiglu"}, "QSparseForCausalLM"),
    "bitnet_qsparse": ("bitnet_qsparse", {}, "QSparseForCausalLM"),
    "bitnet_qsparse_packed": ("bitnet_qsparse", {}, "QSparseForCausalLM"),
    "drelu_qsparse": ("qsparse", {"act": "drelu"}, "QSparseForCausalLM"),
    "moe_dense": ("dense", {"moe": True, "act": "swiglu"}, "MixtralForCausalLM"),
    "moe_qsparse": ("qsparse", {"moe": True, "qkv_bias": True}, "QSparseForCausalLM"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hf_logits_equal_training_model(name, tmp_path, tokenizer):
    kind, kw, cls = CASES[name]
    cfg = make_config(kind, **kw)
    # packed ternary = exactly s·W_q vs training's STE form (<= 1 ulp apart, see test_generate.py): standard init
    scale = 1.0 if name.endswith("packed") else 5.0
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer, scale=scale))
    res = export_hf(ckpt, tmp_path / f"hf_{name}", pack_ternary=name.endswith("packed"))
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference_model(ckpt)(tokens)
    hf, got = _hf_logits(res.out_dir, tokens)
    assert type(hf).__name__ == cls
    assert want.abs().max() > 0.5  # the comparison is not between near-zero numbers
    assert (got - want).abs().max().item() <= TOL
    remote = (res.out_dir / "modeling_qsparse.py").exists()
    assert remote == (cls == "QSparseForCausalLM")
    if name.endswith("packed"):
        from safetensors import safe_open

        with safe_open(str(res.out_dir / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            packed = f.get_tensor("model.layers.0.attn.qkv.weight_packed")
        assert "model.layers.0.attn.qkv.weight" not in keys and packed.dtype == torch.uint8
        assert packed.shape == (cfg.model.hidden_size + 2 * 32, cfg.model.hidden_size // 4)  # 2 bits/weight


def test_remote_code_copies_the_ops_math(tmp_path, tokenizer):
    """ONE home for the math: the export ships qsparse_dist/ops sources, only out-of-package imports rewritten."""
    from qsparse_dist.export.hf import OPS_DIR

    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config("bitnet_qsparse"), tokenizer))
    out = export_hf(ckpt, tmp_path / "hf").out_dir
    for name in ("linear.py", "sparsify.py", "quant.py", "activations.py", "packing.py"):
        exported = (out / name).read_text()
        assert not re.search(r"^\s*from\s+\.\.", exported, flags=re.MULTILINE)
        strip = [ln for ln in (OPS_DIR / name).read_text().splitlines() if not re.match(r"\s*from\s+\.\.", ln)]
        assert all(ln in exported.splitlines() for ln in strip), name  # every other line verbatim
    prov = json.loads((out / "qsparse_export.json").read_text())
    assert prov["arch"] == "qsparse" and "linear.py" in prov["sha256"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_qsparse.QSparseForCausalLM"
    assert cfg["sparsity"] == {"qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5}


def test_remote_code_is_built_from_the_shared_blocks(tmp_path, tokenizer):
    """ONE home for the model: the export ships qsparse_dist/model/blocks.py unchanged and the HF model's
    layers are its classes (the reference model's), not a restatement in modeling_qsparse.py."""
    from transformers import AutoModelForCausalLM

    from qsparse_dist.export.hf import MODEL_DIR

    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config("qsparse", moe=True), tokenizer))
    out = export_hf(ckpt, tmp_path / "hf").out_dir
    assert (out / "blocks.py").read_text() == (MODEL_DIR / "blocks.py").read_text()
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    layer = hf.model.layers[0]
    assert type(layer).__name__ == "DecoderBlock" and type(layer).__module__.endswith(".blocks")
    assert type(layer.attn).__name__ == "Attention" and type(layer.ffn).__name__ == "MoEMLP"
    assert type(hf.model.final_norm).__module__.endswith(".blocks")


def test_tokenizer_encodes_like_sentencepiece(tmp_path, tokenizer):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config("dense", act="swiglu"), tokenizer))
    out = export_hf(ckpt, tmp_path / "hf").out_dir
    tok = AutoTokenizer.from_pretrained(out)  # plain Llama export: no remote code needed
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    text = corpus_text()
    rng = random.Random(0)
    samples = ["Hello world", " leading", "a\n\nb  c", "x  y   z 1234", "tabs\tand 😀 ü", "", "\n", "end  "]
    samples += [text[i:i + rng.randrange(1, 200)] for i in (rng.randrange(len(text) - 200) for _ in range(150))]
    for s in samples:
        ids = sp.encode(s)
        assert tok.encode(s, add_special_tokens=False) == ids, repr(s)
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.eos_token_id == sp.eos_id()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == sp.eos_id()
    assert (out / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


def test_sharded_safetensors_load(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    cfg = make_config("qsparse")
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", cfg, tokenizer))
    res = export_hf(ckpt, tmp_path / "hf", max_shard_size="60KB")
    index = json.loads((res.out_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    hf = AutoModelForCausalLM.from_pretrained(res.out_dir, trust_remote_code=True).eval()
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        assert (hf(tokens).logits - reference_model(ckpt)(tokens)).abs().max() <= TOL


def test_bf16_export_dtype(tmp_path, tokenizer):
    from safetensors import safe_open

    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer))
    out = export_hf(ckpt, tmp_path / "hf", dtype="bfloat16").out_dir
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed.weight").dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ExportError, match="--dtype"):
        export_hf(ckpt, tmp_path / "hf2", dtype="int8")


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_incomplete_checkpoint_names_missing_tensor(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer)
    sd = load_file(str(path / "reference.safetensors"))
    del sd["layers.1.ffn.fc2.weight"]
    save_file(sd, str(path / "reference.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): layers\.1\.ffn\.fc2\.weight"):
        load_checkpoint(path)


def test_mismatched_checkpoint_names_shape(tmp_path, tokenizer):
    path = make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer)
    text = (path / "config.yaml").read_text().replace("ffn_hidden_size: 96", "ffn_hidden_size: 128")
    (path / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*ffn\.fc1\.weight: \(192, 64\) \(config expects \(256, 64\)\)"):
        load_checkpoint(path)


def test_corrupt_checkpoint_files(tmp_path, tokenizer):
    path = make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer)
    data = (path / "reference.safetensors").read_bytes()
    (path / "reference.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    (path / "reference.safetensors").write_bytes(data)
    (path / "config.yaml").write_text("model: {hidden_size: [1, 2]}\n")
    with pytest.raises(CheckpointError, match="model.hidden_size"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")


def test_nan_weights_refused(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    path = make_checkpoint(tmp_path / "ckpt", make_config("dense"), tokenizer)
    sd = load_file(str(path / "reference.safetensors"))
    sd["layers.0.attn.out.weight"][0, 0] = float("nan")
    save_file(sd, str(path / "reference.safetensors"))
    with pytest.raises(CheckpointError, match=r"non-finite.*layers\.0\.attn\.out\.weight"):
        load_checkpoint(path)


def test_unsupported_hf_requests(tmp_path, tokenizer):
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer))
    with pytest.raises(UnsupportedExportError, match="--pack-ternary needs a BitNet model"):
        export_hf(ckpt, tmp_path / "a", pack_ternary=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        export_hf(ckpt, tmp_path / "full")


def test_cli_export_errors_are_clean(tmp_path, tokenizer, capsys):
    from qsparse_dist.cli import main

    path = make_checkpoint(tmp_path / "ckpt", make_config("qsparse"), tokenizer)
    assert main(["export", "--checkpoint", str(path), "--format", "gguf", "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "top-K" in err and "--format hf" in err and "Traceback" not in err
    assert main(["export", "--checkpoint", str(tmp_path / "missing"), "--format", "hf", "--out", str(tmp_path / "h")]) == 2
    assert "checkpoint path not found" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(path), "--format", "hf", "--out", str(tmp_path / "h")]) == 0
    assert (tmp_path / "h" / "config.json").is_file()
