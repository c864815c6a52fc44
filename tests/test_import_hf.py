"""import-hf: tiny random Llama / Qwen2 / Mistral / Mixtral checkpoints built locally with transformers
(no downloads) → reference layout → reference-model logits equal transformers' logits (dense, fp32);
Q-Sparse on the imported SiLU model; the sparsity ramp; clear errors for what cannot be imported."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from import_hf_tiny import ARCHS, VOCAB, build_hf_model, build_tiny_tokenizer  # noqa: E402

from qsparse_dist.cli import main as cli_main  # noqa: E402
from qsparse_dist.config import ConfigError  # noqa: E402
from qsparse_dist.config.schema import SparsityConfig  # noqa: E402
from qsparse_dist.convert import HFImportError, check_model_matches, import_hf, load_imported  # noqa: E402
from qsparse_dist.model.reference import QSparseGPT  # noqa: E402
from qsparse_dist.ops import kept_count  # noqa: E402
from qsparse_dist.train.sparsity_ramp import SparsityRamp, ramp_fraction  # noqa: E402
from tests.corpus import write_corpus  # noqa: E402

DENSE = SparsityConfig(linear="dense", qkv=0, out=0, up=0, down=0)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """arch → (transformers model, its directory).  The Llama directory also holds a tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, arch in enumerate(ARCHS):
        d = root / arch
        out[arch] = (build_hf_model(arch, d, seed=i), d)
    build_tiny_tokenizer(root / "llama", write_corpus(root / "corpus.txt"))
    return out


def _reference(sd, model_cfg, sparsity=DENSE):
    ref = QSparseGPT(model_cfg, sparsity)
    ref.load_state_dict(dict(sd), strict=True)
    return ref.eval()


def _tokens(seed=0, b=2, s=24):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_import_logits_equal_transformers(arch, hf_models, tmp_path):
    hf, d = hf_models[arch]
    out = tmp_path / "imp"
    assert cli_main(["import-hf", "--model", str(d), "--out", str(out)]) == 0
    cfg, sd = load_imported(out)
    meta = json.loads((out / "import.json").read_text())
    assert meta["model_type"] == arch
    assert meta["num_parameters"] == sum(t.numel() for t in sd.values())
    assert cfg.sparsity.linear == "dense"
    assert cfg.model.qkv_bias == (arch == "qwen2")
    assert cfg.model.tie_embeddings == (arch == "qwen2")
    assert (cfg.model.moe is not None) == (arch == "mixtral")
    assert cfg.model.rope_theta == 5000.0 and cfg.model.norm_eps == 1e-5 and cfg.model.num_query_groups == 2
    if arch == "mistral":
        assert cfg.model.seq_length == 64 and "sliding_window=64" in meta["notes"][0]
    ref = _reference(sd, cfg.model)
    toks = _tokens()
    with torch.no_grad():
        diff = (ref(toks) - hf(toks).logits).abs().max().item()
    assert diff <= 1e-5, f"{arch}: max |reference - transformers| = {diff}"


def test_tokenizer_kept_and_bf16_sharded(hf_models, tmp_path):
    _, d = hf_models["llama"]
    out = tmp_path / "imp"
    meta = import_hf(d, out, dtype="bf16", max_shard_bytes=40_000,
                     overrides=["sparsity.linear=qsparse", "sparsity.down=0.6", "sparsity.ramp_steps=10"])
    assert meta["num_shards"] > 1 and (out / "model.safetensors.index.json").is_file()
    assert {"tokenizer.json", "chat_template.jinja"} <= set(meta["tokenizer_files"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert len(tok) == VOCAB and tok.chat_template
    cfg, sd = load_imported(out)
    assert cfg.sparsity.linear == "qsparse" and cfg.sparsity.down == 0.6 and cfg.sparsity.ramp_steps == 10
    assert all(sd[k].dtype == torch.bfloat16 for k in sd)
    _, full = load_imported(_import(d, tmp_path / "fp32"))
    assert set(sd) == set(full) and all(torch.equal(sd[k], full[k].to(torch.bfloat16)) for k in sd)


def _import(d, out):
    import_hf(d, out)
    return out


def test_sharded_hf_input(hf_models, tmp_path):
    hf, _ = hf_models["qwen2"]
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="20KB")
    assert (d / "model.safetensors.index.json").is_file()
    cfg, sd = load_imported(_import(d, tmp_path / "imp"))
    toks = _tokens(1)
    with torch.no_grad():
        assert (_reference(sd, cfg.model)(toks) - hf(toks).logits).abs().max().item() <= 1e-5


def test_qsparse_on_imported_silu_model(hf_models, tmp_path):
    """Top-K after the SiLU-GLU activation (fc2 input) and on the other projections' inputs, with
    the configured fraction of zeros; the ramp starts dense (= transformers) and ends at the target."""
    hf, d = hf_models["llama"]
    cfg, sd = load_imported(_import(d, tmp_path / "imp"))
    target = SparsityConfig(linear="qsparse", qkv=0.5, out=0.25, up=0.5, down=0.75, ramp_steps=4)
    ref = _reference(sd, cfg.model, target)
    ref.set_track_sparsity(True)
    toks = _tokens(2)
    ramp = SparsityRamp(ref, target.ramp_steps)
    assert ramp.active
    with torch.no_grad():
        at_target = ref(toks)
        stats = ref.sparsity_stats()
        for i in range(cfg.model.num_layers):
            for proj, dim in (("qkv", 64), ("out", 64), ("up", 64), ("down", 96)):
                want = 1 - kept_count(dim, getattr(target, proj)) / dim
                assert stats[f"layers.{i}.{proj}"] >= want - 1e-6, (proj, stats[f"layers.{i}.{proj}"], want)
        assert ramp.apply(0) == 0.0
        assert (ref(toks) - hf(toks).logits).abs().max().item() <= 1e-5  # step 0 is dense
        assert ramp.apply(2) == 0.5
        assert ref.layers[0].ffn.fc2.recipe.sparsity == pytest.approx(0.375)
        assert ref.layers[1].attn.out.recipe.sparsity == pytest.approx(0.125)
        half = ref(toks)
        assert ramp.apply(4) == 1.0 and ramp.apply(100) == 1.0
        assert torch.equal(ref(toks), at_target)
        assert not torch.allclose(half, at_target) and not torch.allclose(half, hf(toks).logits)
    assert ramp_fraction(3, 0) == 1.0 and ramp_fraction(1, 4) == 0.25


def test_bitnet_conversion_of_imported_model(hf_models, tmp_path):
    """Optional BitNet conversion: the same imported weights run as ternary-weight / int8-activation
    linears with top-K (the latent weights stay the pretrained ones)."""
    _, d = hf_models["mixtral"]
    cfg, sd = load_imported(_import(d, tmp_path / "imp"))
    ref = _reference(sd, cfg.model, SparsityConfig(linear="bitnet_qsparse", qkv=0.5, out=0.5, up=0.5, down=0.5))
    w = ref.layers[0].ffn.experts[0].fc1
    q = w.recipe.weight(w.weight)
    assert q.unique().numel() <= 3 and torch.equal(w.weight, sd["layers.0.ffn.experts.0.fc1.weight"])
    with torch.no_grad():
        logits = ref(_tokens(3))
    assert torch.isfinite(logits).all()


# ----------------------------------------------------------------------------- errors


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _copy(d: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(d, dst)
    return dst


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "g")
    with pytest.raises(HFImportError, match=r"model_type='gpt2'.*supported: \['llama', 'mistral', 'mixtral', 'qwen2'\]"):
        import_hf(tmp_path / "g", tmp_path / "o")
    assert cli_main(["import-hf", "--model", str(tmp_path / "g"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, match", [
    ({"intermediate_size": 128}, r"'model.layers.0.mlp.gate_proj.weight' has shape \[96, 64\], but config.json implies \[128, 64\]"),
    ({"num_key_value_heads": 4}, r"'model.layers.0.self_attn.k_proj.weight' has shape \[32, 64\], but config.json implies \[64, 64\]"),
    ({"num_hidden_layers": 3}, r"missing tensor 'model.layers.2.input_layernorm.weight'"),
    ({"num_hidden_layers": 1}, r"tensors not covered by the Llama/Mistral mapping: \['model.layers.1"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"head_dim": 32}, r"head_dim=32 differs"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, r"rope_parameters.rope_type='llama3'"),
    ({"attention_bias": True}, r"attention_bias=true"),
])
def test_bad_checkpoints_give_clear_errors(hf_models, tmp_path, change, match):
    d = _copy(hf_models["llama"][1], tmp_path / "m")
    _edit_config(d, **change)
    with pytest.raises(HFImportError, match=match):
        import_hf(d, tmp_path / "o")


def test_leftover_and_missing_files(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(hf_models["qwen2"][1], tmp_path / "m")
    sd = load_file(d / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(HFImportError, match=r"not covered by the Qwen2 mapping: \['model.layers.0.self_attn.o_proj.bias'\]"):
        import_hf(d, tmp_path / "o")
    (d / "model.safetensors").unlink()
    with pytest.raises(HFImportError, match="no \\*.safetensors weight files"):
        import_hf(d, tmp_path / "o")
    with pytest.raises(HFImportError, match="no config.json"):
        import_hf(tmp_path, tmp_path / "o")


def test_out_dir_and_run_config_checks(hf_models, tmp_path):
    d = hf_models["mistral"][1]
    out = _import(d, tmp_path / "imp")
    with pytest.raises(HFImportError, match="exists and is not empty"):
        import_hf(d, out)
    import_hf(d, out, overwrite=True)
    with pytest.raises(HFImportError, match="--seq-length 100 exceeds the checkpoint's sliding_window=64"):
        import_hf(d, tmp_path / "o2", seq_length=100)
    with pytest.raises(ConfigError, match="may not change the model section"):
        import_hf(d, tmp_path / "o3", overrides=["model.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"sparsity.down"):
        import_hf(d, tmp_path / "o4", overrides=["sparsity.down=1.5"])
    cfg, _ = load_imported(out)
    run = cfg.model.model_copy(update={"hidden_size": 128, "seq_length": 32})
    with pytest.raises(ConfigError, match=r"model.hidden_size: run has 128, the import at .* has 64"):
        check_model_matches(cfg.model, run)
    check_model_matches(cfg.model, cfg.model.model_copy(update={"seq_length": 32}))  # free field
    with pytest.raises(ConfigError, match="not a directory written by `qsparse-dist import-hf`"):
        load_imported(tmp_path)


# ----------------------------------------------------------------------------- megatron (2 processes)


def _sft_batch_and_loss(hf, row, doc):
    """A packed SFT micro-batch (random loss mask) and its loss computed example by example with
    transformers: Σ mask·CE / Σ mask."""
    g = torch.Generator().manual_seed(9)
    labels = torch.randint(0, VOCAB, row.shape, generator=g)
    mask = (torch.rand(row.shape, generator=g) < 0.5).float()
    num = torch.zeros(())
    for k in range(int(doc.max()) + 1):
        sel = doc[0] == k
        with torch.no_grad():
            lg = hf(row[:, sel]).logits[0]
        ce = torch.nn.functional.cross_entropy(lg, labels[0, sel], reduction="none")
        num += (ce * mask[0, sel]).sum()
    batch = {"tokens": row, "labels": labels, "loss_mask": mask, "doc_ids": doc}
    return batch, num / mask.sum()


@pytest.mark.dist
def test_import_into_megatron_tp_pp_ep(hf_models, tmp_path):
    """import → megatron GPT logits equal transformers' logits (dense, fp32) at TP=1 and TP=2 (MoE:
    TP=2+SP and EP=2), the PP=2 loss equals transformers' loss; a packed row with the block-diagonal
    mask leaks nothing between examples and its loss-masked SFT loss is the per-example loss."""
    from tests.dist_utils import torchrun

    for arch, (hf, d) in hf_models.items():
        import_hf(d, tmp_path / arch / "imp")
        toks = _tokens(5, s=16)
        with torch.no_grad():
            expected = {"tokens": toks, "logits": hf(toks).logits, "labels": toks.roll(-1, dims=1)}
            expected["loss"] = torch.nn.functional.cross_entropy(expected["logits"].flatten(0, 1),
                                                                 expected["labels"].flatten())
        if arch == "llama":
            expected["packed_tokens"] = _tokens(6, b=1, s=24)
            expected["packed_doc_ids"] = doc = torch.tensor([[0] * 10 + [1] * 9 + [2] * 5])
            expected["sft_batch"], expected["sft_loss"] = _sft_batch_and_loss(hf, expected["packed_tokens"], doc)
        torch.save(expected, tmp_path / arch / "expected.pt")
    expected_sft = torch.load(tmp_path / "llama" / "expected.pt")["sft_loss"].item()
    res = torchrun("import_megatron.py", 2, tmp_path / "out", [tmp_path, ",".join(ARCHS)])
    print(json.dumps({"rank0": res[0], "rank1_pp2": {k: v for k, v in res[1].items() if k.endswith("/pp2")}}))
    assert set(res[0]) == set(res[1])
    pp_checked = 0
    for key in res[0]:
        arch = key.split("/")[0]
        entry, last = res[0][key], res[1][key]
        assert "error" not in entry and "error" not in last, f"{key}: {entry} {last}"
        if key.endswith("/pp2"):  # the loss lives on the last pipeline stage (rank 1)
            want = torch.load(tmp_path / arch / "expected.pt")["loss"].item()
            assert entry["loss"] is None and abs(last["loss"] - want) <= 1e-5, (key, last["loss"], want)
            pp_checked += 1
            continue
        assert entry["max_diff"] <= 1e-4, f"{key}: max |megatron - transformers| = {entry['max_diff']}"
        if "sft_loss" in entry:  # packed + loss-masked SFT loss through megatron = per-example HF loss
            assert abs(entry["sft_loss"] - expected_sft) <= 1e-5, (key, entry["sft_loss"], expected_sft)
        if "packed_leakage" in entry:
            assert entry["packed_leakage"] <= 1e-4, f"{key}: packed-row leakage {entry['packed_leakage']}"
            assert entry["causal_mask_leakage"] > 1e-2, f"{key}: control without the block mask should leak"
    assert pp_checked == 3  # llama, qwen2 (tied embeddings across stages), mistral
    assert {k.split("/")[0] for k in res[0]} == set(ARCHS)


# ----------------------------------------------------------------------------- the 7B recipe

MISTRAL_7B_V01 = {  # Mistral-7B-v0.1's config.json (transformers < 5 field names), transcribed
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 32000,
}


def test_7b_recipe_config_matches_mistral_7b(tmp_path):
    """configs/continue_train_7b_qsparse.yaml validates, its model section is what import-hf derives
    from Mistral-7B-v0.1's config.json, and the launch script's dry run wires import → data → train."""
    import os
    import subprocess

    from qsparse_dist.config import load_config
    from qsparse_dist.convert import model_config_from_hf

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "continue_train_7b_qsparse.yaml")
    model, notes = model_config_from_hf(MISTRAL_7B_V01)
    check_model_matches(model, cfg.model)
    assert model.seq_length == 4096 and "sliding_window=4096" in notes[0]
    assert cfg.sparsity.linear == "qsparse" and cfg.sparsity.down > 0 and cfg.sparsity.ramp_steps > 0
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    env = {**os.environ, "QSD_DS_ENV_FILE": str(tmp_path / "ds_env")}
    out = subprocess.run(
        ["bash", str(root / "launch" / "continue_train_7b.sh"), "--hf-model", "/models/mistral", "--corpus",
         "corpus.jsonl", "--hostfile", str(tmp_path / "hosts"), "--work", str(tmp_path / "w"), "--dry-run",
         "--", "train.steps=5"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert f"+ python -m qsparse_dist.cli import-hf --model /models/mistral --out {tmp_path}/w/import --dtype bf16" in lines
    assert any(f"prepare-data --input corpus.jsonl --out {tmp_path}/w/data --tokenizer {tmp_path}/w/import/tokenizer" in x
               for x in lines)
    assert any("--module qsparse_dist.train --config" in x and f"checkpoint.init_from={tmp_path}/w/import" in x
               and x.rstrip().endswith("train.steps=5") for x in lines)
