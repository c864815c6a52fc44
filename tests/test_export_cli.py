"""``qsparse-dist export`` refusals seen from outside: the real command in a subprocess, exit status 2
and exactly one line on stderr that names the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qsparse_dist.cli", "export", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _training_checkpoint_without_manifest(run: Path) -> Path:
    """``RUN/checkpoints/step_N`` laid out as ``train/checkpoint.py`` writes it (docs/checkpoints.md),
    after someone deleted its ``manifest.json``."""
    from safetensors.torch import save_file

    step = run / "checkpoints" / "step_00000002"
    (step / "model").mkdir(parents=True)
    save_file({"embedding.word_embeddings.weight": torch.zeros(8, 4)}, str(step / "model" / "tp00_pp00.safetensors"))
    (step / "meta.json").write_text(json.dumps({"step": 2, "config": {}, "parallel": {"tp": 1, "pp": 1}}))
    (run / "checkpoints" / "latest").write_text(step.name)
    return step


def test_missing_manifest_is_named(tmp_path):
    step = _training_checkpoint_without_manifest(tmp_path / "run")
    # one checkpoint (issue 14, 4b), and the run directory, whose `latest` names it (train/checkpoint.py)
    for target, says in ((step, "STEP/manifest.json is missing"), (tmp_path / "run", "No such file")):
        proc = _export("--checkpoint", str(target), "--format", "hf", "--out", str(tmp_path / "out"))
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        line = lines[0].replace(str(step), "STEP")  # the words checked below must not come from the path
        assert "manifest.json" in line and says in line, line
        assert not (tmp_path / "out").exists()
