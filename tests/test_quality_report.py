"""``qsparse-dist report``: two real single-process CPU trainings (dense and Q-Sparse), then the
report's table is checked against what the trainer itself wrote to metrics.jsonl (val loss, tokens)
and the configured sparsity, and its PNGs are read back by matplotlib."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse_dist.cli import main as cli_main
from qsparse_dist.data import prepare_data
from tests.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[1]

TINY = ["model.hidden_size=64", "model.num_layers=2", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=128", "model.seq_length=64", "parallel.tp=1", "parallel.zero_stage=0",
        "data.micro_batch_size=4", "data.global_batch_size=4", "train.steps=6", "train.log_interval=1",
        "train.eval_interval=3", "train.eval_iters=1", "checkpoint.interval=6", "logging.tensorboard=false",
        "logging.progress_bar=false", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quality")
    src = write_corpus(root / "corpus.txt", 60_000)
    prepare_data([str(src)], root / "data", vocab_size=512, valid_fraction=0.05, log=lambda *a: None)
    kinds = {"dense": ["sparsity.linear=dense"],
             "qsparse": ["sparsity.linear=qsparse", "sparsity.qkv=0.5", "sparsity.out=0.5", "sparsity.up=0.5",
                         "sparsity.down=0.25"]}
    for name, extra in kinds.items():
        cmd = [sys.executable, "-m", "qsparse_dist.cli", "train", "--config", str(ROOT / "configs/quickstart_cpu.yaml"),
               f"data.path={root / 'data'}", f"train.run_dir={root / 'runs' / name}", *TINY, *extra]
        subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    return root / "runs"


def _rows(md: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def test_report_table_matches_the_trainers_metrics(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli_main(["report", str(runs), "--out", str(out)]) == 0
    rows = _rows((out / "report.md").read_text())
    assert set(rows) == {"dense", "qsparse"}
    recs = {k: [json.loads(x) for x in (runs / k / "metrics.jsonl").read_text().splitlines()] for k in rows}
    val = {k: [r["val_loss"] for r in v if "val_loss" in r][-1] for k, v in recs.items()}
    for k, cells in rows.items():
        assert float(cells[5]) == pytest.approx(val[k], abs=5e-5)
        assert cells[4] == f"{recs[k][-1]['tokens'] / 1e6:.1f}M"
    gap = 100 * (val["qsparse"] - val["dense"]) / val["dense"]
    assert rows["qsparse"][6] == f"{gap:+.2f}%" and rows["dense"][6] == "—"
    # measured sparsity: the trainer's own count of zeros; top-K keeps exactly k of d per token, and the
    # relu²GLU output feeding `down` is zero where top-K dropped nothing (so ≥ the configured 0.25)
    q, o, u, d = (float(x) for x in rows["qsparse"][8].split("/"))
    assert (q, o, u) == pytest.approx((0.5, 0.5, 0.5), abs=2e-3) and d >= 0.25 - 2e-3
    import matplotlib.image as mpimg

    for png in ("loss.png", "sparsity.png"):
        assert mpimg.imread(out / png).shape[0] > 100


def test_report_errors(runs, tmp_path, capsys):
    assert cli_main(["report", str(runs), "--out", str(tmp_path / "r"), "--baseline", "nope"]) == 2
    assert "--baseline nope" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "no such directory" in capsys.readouterr().err
