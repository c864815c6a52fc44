"""A training job's life on the console and at its end, with real processes (gloo on the CPU), each
rank started as a launcher would (``RANK``/``WORLD_SIZE``/``MASTER_*``), plus one run through the
``deepspeed`` launcher:

* default output is one line per event from rank 0 (no per-rank library notices, no megatron
  "Unknown MLP type" lines, no DeepSpeed INFO); ``--verbose`` shows them (issue 14, 4h);
* a refusal after ``init_distributed`` (corrupt checkpoint on resume) exits 2 on every rank, after a
  clean teardown, with one error line — repeated, since the teardown race it replaces showed in
  about 1 launch of 4 (``terminate called without an active exception``, launcher exit 250) (4c);
* a single-process CLI run leaves no process group behind (4c);
* resuming with another ``train.steps`` is refused naming the field, unless
  ``train.allow_schedule_change=true`` (4g).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qsparse_dist.data import prepare_data
from tests.corpus import write_corpus
from tests.dist_utils import free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ERROR = "qsparse-dist train: error:"
NOISE = ("Unknown MLP type", "UserWarning", "Setting accelerator", "[INFO]", "warnings.warn")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONWARNINGS", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _ranks(nproc: int, args: list[str], timeout: int = 600) -> list[tuple[int, str]]:
    """Start ``nproc`` ranks of ``python -m qsparse_dist.train ARGS``; return ``(exit code, stdout+stderr)``
    of each."""
    port = str(free_port())
    procs = []
    for r in range(nproc):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "qsparse_dist.train", *args], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = []
    for p in procs:
        text, _ = p.communicate(timeout=timeout)
        out.append((p.returncode, text))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-rank run of 2 steps with the default console settings; its checkpoint and output."""
    base = tmp_path_factory.mktemp("life")
    data = base / "data"
    prepare_data([str(write_corpus(base / "corpus.txt", 60_000))], data, vocab_size=320, valid_fraction=0.05,
                 log=lambda *a: None)
    cfg = {"model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
                     "ffn_hidden_size": 64, "seq_length": 32},
           "data": {"path": str(data), "micro_batch_size": 2, "global_batch_size": 8},
           "parallel": {"zero_stage": 1},
           "train": {"steps": 2, "log_interval": 1, "seed": 7, "run_dir": str(base / "run")},
           "logging": {"progress_bar": False, "tensorboard": False, "peak_tflops": 1.0}}
    path = base / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ranks = _ranks(2, ["--config", str(path)])
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:] + ranks[1][1][-3000:]
    return {"base": base, "config": path, "run": base / "run", "ranks": ranks}


def test_default_output_is_one_line_per_event_from_rank0(trained):
    (_, out0), (_, out1) = trained["ranks"]
    assert out1.strip() == "", out1[-3000:]  # rank 1 has nothing to say
    assert out0.count("qsparse-dist train: world 2") == 1 and out0.count("step      2 |") == 1, out0
    assert [n for n in NOISE if n in out0] == [], out0[-3000:]


def test_verbose_shows_library_output(trained):
    ranks = _ranks(2, ["--config", str(trained["config"]), "--verbose", "train.steps=1",
                       f"train.run_dir={trained['base'] / 'verbose'}"])
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:]
    text = ranks[0][1] + ranks[1][1]
    assert "Unknown MLP type" in text and "[INFO]" in text, text[-3000:]
    assert ranks[1][1].strip(), "rank 1 printed nothing with --verbose"


def test_resume_with_other_train_steps_is_refused_unless_allowed(trained):
    run = trained["base"] / "schedule"
    shutil.copytree(trained["run"], run)
    args = ["--config", str(trained["config"]), f"train.run_dir={run}", "train.steps=4"]
    ranks = _ranks(2, args)
    assert [rc for rc, _ in ranks] == [2, 2], ranks
    text = ranks[0][1] + ranks[1][1]
    assert text.count(ERROR) == 1 and "train.steps (checkpoint 2, now 4)" in text, text[-3000:]
    assert "train.allow_schedule_change=true" in text
    ranks = _ranks(2, [*args, "train.allow_schedule_change=true"])
    assert [rc for rc, _ in ranks] == [0, 0], ranks[0][1][-3000:]
    assert "resumed from" in ranks[0][1] and "step      4 |" in ranks[0][1]


def _corrupt_newest(run: Path) -> str:
    newest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    victim = sorted((newest / "stage_00" / "ds").glob("*optim_states.pt"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    return victim.name


def test_corrupt_checkpoint_refusal_exits_2_on_every_rank_with_one_line(trained):
    run = trained["base"] / "corrupt"
    shutil.copytree(trained["run"], run)
    victim = _corrupt_newest(run)
    args = ["--config", str(trained["config"]), f"train.run_dir={run}"]
    for attempt in range(3):
        ranks = _ranks(2, args)
        text = ranks[0][1] + ranks[1][1]
        assert [rc for rc, _ in ranks] == [2, 2], (attempt, ranks)
        assert text.count(ERROR) == 1 and "is corrupt" in text and victim in text, (attempt, text[-3000:])
        assert "terminate called" not in text and "Traceback" not in text, (attempt, text[-3000:])
    # the deepspeed launcher returns the ranks' status (it returned 250 = abort when a rank died in teardown)
    r = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                        str(free_port()), "--log_level", "warning", "--module", "qsparse_dist.train", *args],
                       env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    text = r.stdout + r.stderr
    assert r.returncode == 2, (r.returncode, text[-3000:])
    assert text.count(ERROR) == 1 and "terminate called" not in text, text[-3000:]


def test_single_process_cli_leaves_no_process_group(trained, tmp_path):
    code = ("import sys, torch.distributed as dist; from qsparse_dist.train import main; "
            "rc = main(sys.argv[1:]); print('RC', rc, 'PG', dist.is_initialized())")
    r = subprocess.run([sys.executable, "-c", code, "--config", str(trained["config"]), "train.steps=1",
                        f"train.run_dir={tmp_path / 'one'}"], env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert "RC 0 PG False" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert "destroy_process_group" not in r.stderr, r.stderr[-3000:]
    assert json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
