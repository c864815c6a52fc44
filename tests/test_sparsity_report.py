"""``tools/sparsity_report.py`` and ``qsparse_dist.analysis.sparsity_report`` on a tiny trained model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qsparse_dist.analysis.sparsity_report import format_report, measure_sparsity, token_batches
from qsparse_dist.config import config_from_dict
from qsparse_dist.data import TokenFile, prepare_data
from qsparse_dist.export.consolidate import save_reference_checkpoint
from qsparse_dist.model import QSparseGPT
from tests.corpus import write_corpus
from tests.tools_loader import load_tool


def _load_tool():
    return load_tool("sparsity_report")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    out = tmp_path_factory.mktemp("data")
    prepare_data([str(corpus)], out, vocab_size=400, max_documents=200, valid_fraction=0.05, num_proc=1,
                 log=lambda *a: None)
    return out


def tiny_config(moe: bool, linear: str = "qsparse"):
    model = {"vocab_size": 400, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
             "ffn_hidden_size": 64, "seq_length": 32}
    if moe:
        model["moe"] = {"num_experts": 4, "router_topk": 2}
    return config_from_dict({"model": model, "sparsity": {"linear": linear, "qkv": 0.5, "out": 0.5,
                                                           "up": 0.5, "down": 0.75}})


@pytest.fixture(scope="module")
def moe_checkpoint(data_dir, tmp_path_factory):
    """A tiny MoE Q-Sparse model trained for a few steps on the prepared data."""
    torch.manual_seed(0)
    cfg = tiny_config(moe=True)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    toks = TokenFile(data_dir, "train").tokens
    batch = next(iter(token_batches(toks, 33, 8, 1)))
    for _ in range(5):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 400), batch[:, 1:].reshape(-1)) + model.aux_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_reference_checkpoint(tmp_path_factory.mktemp("ckpt"), model.state_dict(), cfg), cfg


def test_token_batches():
    toks = np.arange(1000)
    batches = list(token_batches(toks, 10, 4, 3))
    assert [tuple(b.shape) for b in batches] == [(4, 10)] * 3
    assert batches[0][0].tolist() == list(range(10)) and batches[0].dtype == torch.int64
    assert len(list(token_batches(np.arange(25), 10, 4, 3))) == 1  # only 2 windows exist
    with pytest.raises(ValueError, match="fewer than one window"):
        list(token_batches(np.arange(5), 10, 4, 1))


def test_measure_dense_ffn_matches_targets():
    cfg = tiny_config(moe=False)
    torch.manual_seed(1)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    batches = [torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    rep = measure_sparsity(model, cfg, batches)
    assert rep.sparsity.shape == (2, 4) and rep.tokens == 128 and rep.batches == 2
    assert np.allclose(rep.sparsity[:, :3], 0.5)  # qkv, out, up: exactly the top-K zeros
    assert np.all(rep.sparsity[:, 3] >= 0.75)  # down: top-K plus the activation's own zeros
    assert rep.target == {"qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.75}
    assert rep.expert_load is None
    assert not any(getattr(m, "track_sparsity", False) for m in model.modules())  # switched off again
    text = format_report(rep)
    assert "top-K" in text and "0.5000" in text


def test_batch_union_counts_the_features_any_stream_keeps():
    """``measure_batch_union`` against a direct count: the inputs captured by hooks, masks from the torch
    top-K, the union of each group of sequences counted feature by feature in Python."""
    from qsparse_dist.analysis.sparsity_report import measure_batch_union
    from qsparse_dist.layers import SparseLinear
    from qsparse_dist.ops import topk_mask

    cfg = tiny_config(moe=False)
    torch.manual_seed(2)
    model = QSparseGPT(cfg.model, cfg.sparsity).eval()
    batch = torch.randint(0, 400, (4, 16), generator=torch.Generator().manual_seed(5))
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, a[0].clone()))
             for n, m in model.named_modules() if isinstance(m, SparseLinear)]
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    got = measure_batch_union(model, [batch], group=2)

    def union(mask):  # mask [4, T, K]: sequences (0, 1) and (2, 3) decode together
        b, t, k = mask.shape
        hits = sum(any(bool(mask[s, p, f]) for s in pair) for pair in ((0, 1), (2, 3)) for p in range(t)
                   for f in range(k))
        return hits / (2 * t * k)

    xs = [seen[f"layers.{i}.attn.qkv"] for i in (0, 1)]
    ref_own = sum(union(x * topk_mask(x, 0.5) != 0) for x in xs) / 2
    ref_nm = sum(union(topk_mask(x, 0.5, block_size=4)) for x in xs) / 2
    qkv = got["qkv"]
    assert qkv["single"] == pytest.approx(0.5)
    assert qkv["own"] == pytest.approx(ref_own, abs=1e-6) and qkv["nm"] == pytest.approx(ref_nm, abs=1e-6)
    assert 0.5 < ref_own < 1.0 and 0.5 < ref_nm < 1.0
    assert set(got) == {"qkv", "out", "up", "down"}


def test_tool_on_trained_moe_checkpoint(moe_checkpoint, data_dir, tmp_path, capsys):
    ckpt, cfg = moe_checkpoint
    out = tmp_path / "report"
    rc = _load_tool().main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--batches", "2",
                            "--batch-size", "4", "--batch-union", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "MoE expert load" in text and "[valid]" in text
    rep = json.loads((out / "sparsity_report.json").read_text())
    sp = np.array(rep["sparsity"], dtype=float)
    assert sp.shape == (2, 4)
    assert np.allclose(sp[:, :3], 0.5) and np.all(sp[:, 3] >= 0.75)
    load = np.array(rep["expert_load"])
    assert load.shape == (2, 4) and np.allclose(load.sum(1), 1.0)
    assert rep["tokens"] == 2 * 4 * 32 and rep["split"] == "valid"
    assert all(r >= 1.0 for r in rep["expert_load_max_over_mean"])
    assert (out / "sparsity_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sparsity_report.txt").read_text().startswith("activation sparsity")
    union = rep["batch_union"]["per_projection"]  # attention projections only (MoE experts left out)
    assert rep["batch_union"]["group"] == 4 and set(union) == {"qkv", "out"}
    assert all(d["single"] <= d["own"] <= 1.0 and 0.5 <= d["nm"] <= 1.0 for d in union.values())
    assert "decode streams reads" in text


def test_tool_errors(moe_checkpoint, data_dir, tmp_path, capsys):
    tool = _load_tool()
    ckpt, cfg = moe_checkpoint
    assert tool.main(["--checkpoint", str(tmp_path), "--data", str(data_dir)]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(ckpt), "--data", str(tmp_path)]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--batches", "0"]) == 2
    assert "--batches must be >= 1" in capsys.readouterr().err
    assert tool.main(["--checkpoint", str(ckpt), "--data", str(data_dir), "--batch-size", "2", "--batch-union", "4"]) == 2
    assert "--batch-union must be between 0 and --batch-size (2)" in capsys.readouterr().err
    # a model whose vocabulary is smaller than the data's token ids
    small = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 50})})
    torch.manual_seed(0)
    sd = QSparseGPT(small.model, small.sparsity).state_dict()
    bad = save_reference_checkpoint(tmp_path / "small", sd, small)
    assert tool.main(["--checkpoint", str(bad), "--data", str(data_dir), "--batches", "1"]) == 2
    assert "outside the model's vocab_size=50" in capsys.readouterr().err
