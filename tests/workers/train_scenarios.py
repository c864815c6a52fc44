"""Worker: train each named scenario (tests/workers/train_common.py) in turn inside one launch and
report, per scenario, the per-step (loss, grad_norm) of metrics.jsonl.  A name ending in ``+resume``
is trained (checkpoints every 2 steps), then resumed from its step-2 checkpoint: ``resumed`` holds the
losses of the re-run steps and ``first`` those of the same steps in the first run.

argv: DATA_DIR OUT_DIR INIT_ROOT NAME[+resume]...   (INIT_ROOT/<family>: reference weights per model family)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_utils import write_result  # noqa: E402
from train_common import family, read_metrics, scenario_dict  # noqa: E402

from qsparse_dist.config import config_from_dict  # noqa: E402
from qsparse_dist.train.loop import train  # noqa: E402

data_dir, out_dir, init_root, *names = sys.argv[1:]
results = {}
for spec in names:
    name, _, mode = spec.partition("+")
    run_dir = str(Path(out_dir) / name)
    d, overrides = scenario_dict(name, data_dir, run_dir, str(Path(init_root) / family(name)))
    if mode == "resume":
        overrides = [*overrides, "checkpoint.interval=2"]
    train(config_from_dict(d, overrides))
    results[name] = [[r["loss"], r["grad_norm"]] for r in read_metrics(run_dir)]
    if mode == "resume":
        train(config_from_dict(d, [*overrides, "checkpoint.load=step_00000002"]))
        again = read_metrics(run_dir)
        results[name + "+resume"] = {"first": results[name][2:], "resumed": [[r["loss"], r["grad_norm"]] for r in again[2:]],
                                     "steps": [r["step"] for r in again]}
write_result(results)
