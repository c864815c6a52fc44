"""Export from real ``qsparse-dist train`` checkpoints (2 processes, gloo): TP=2 (tied embeddings),
ZeRO-3 (BitNet+Q-Sparse), PP=2 (block Q-Sparse) and MoE with EP=2.  The exported HF model — and the
runtime loading it — must give the logits of the trained megatron-core model itself: the live
DeepSpeed engine, evaluated in the worker right after its last training step (never read back from
the checkpoint), fp32 max abs diff <= 1e-4.  Corrupt and incomplete training checkpoints are refused
with an error naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qsparse_dist.export import CheckpointError, export_hf, load_checkpoint
from tests.dist_utils import torchrun

pytestmark = pytest.mark.dist

SCENARIOS = ["tp2_z1", "dp2_z3_bitnet", "pp2_block", "moe_ep2"]
LAYOUT = {"tp2_z1": "tp=2 pp=1 ep=1 zero=1", "dp2_z3_bitnet": "tp=1 pp=1 ep=1 zero=3",
          "pp2_block": "tp=1 pp=2 ep=1 zero=0", "moe_ep2": "tp=1 pp=1 ep=2 zero=1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from qsparse_dist.data.prepare import prepare_data
    from tests.corpus import write_corpus

    root = tmp_path_factory.mktemp("export_ckpt")
    write_corpus(root / "corpus.txt", 60_000)
    prepare_data([str(root / "corpus.txt")], root / "data", vocab_size=320, valid_fraction=0.05, log=lambda *a: None)
    torchrun("export_ckpt.py", 2, root / "runs", [root / "data", root / "runs", *SCENARIOS], timeout=600)
    return root / "runs"


def _megatron_logits(runs: Path, name: str) -> torch.Tensor:
    """The live engine's logits the worker wrote after training (rank 0, gathered over TP/PP)."""
    from safetensors.torch import load_file

    return load_file(str(runs / f"{name}_logits.safetensors"))["logits"]


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(123))  # worker's tokens


@pytest.mark.parametrize("name", SCENARIOS)
def test_export_equals_trained_megatron_model(name, runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from qsparse_dist.infer.runtime import load_model

    ckpt = load_checkpoint(runs / name)  # a run directory: its latest checkpoint
    assert LAYOUT[name] in ckpt.layout and ckpt.step == 2
    assert ckpt.tokenizer_file is not None and ckpt.special_tokens["eos"] == 2
    want = _megatron_logits(runs, name)
    tokens = _tokens(ckpt.config.model.vocab_size)
    out = export_hf(ckpt, tmp_path / "hf").out_dir
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    lm = load_model(out, device="cpu")
    with torch.no_grad():
        got_hf = hf(tokens).logits
        got_rt = lm.model(tokens)
    assert want.abs().max() > 0.1
    assert (got_hf - want).abs().max().item() <= 1e-4
    assert (got_rt - want).abs().max().item() <= 1e-4


def test_cli_export_and_generate_from_run_dir(runs, tmp_path, capsys):
    from qsparse_dist.cli import main

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(runs / "tp2_z1"), "--format", "hf", "--out", str(out)]) == 0
    assert "training (tp=2" in capsys.readouterr().err
    assert main(["generate", "--model", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def _copy(runs: Path, name: str, dst: Path) -> Path:
    ckpt = load_checkpoint(runs / name).source
    shutil.copytree(ckpt, dst)
    return dst


def test_corrupt_training_checkpoint(runs, tmp_path):
    ck = _copy(runs, "tp2_z1", tmp_path / "step")
    shard = ck / "model" / "tp01_pp00.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model/tp01_pp00\.safetensors: sha256 mismatch"):
        load_checkpoint(ck)
    (ck / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"step/manifest\.json is missing"):  # issue 14, 4b
        load_checkpoint(ck)


def test_incomplete_training_checkpoint(runs, tmp_path):
    ck = _copy(runs, "moe_ep2", tmp_path / "step")
    (ck / "model" / "experts_pp00_ep01.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"experts_pp00_ep01\.safetensors: missing"):
        load_checkpoint(ck)  # the manifest catches it first
    manifest = json.loads((ck / "manifest.json").read_text())
    del manifest["files"]["model/experts_pp00_ep01.safetensors"]
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint for tp=1 pp=1 ep=2: missing model/experts_pp00_ep01"):
        load_checkpoint(ck)  # a consistent manifest, but a shard of the layout is absent
