"""Scaling-law fit, inference-optimal sparsity, run reading, the CLI and the sweep planner (issue 9)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from qsparse_dist.analysis import (
    PAPER_FULL_PRECISION,
    ScalingLaw,
    count_params,
    fit_scaling_law,
    load_runs,
    optimal_sparsity,
    overall_sparsity,
)
from qsparse_dist.analysis.runs import projection_params
from qsparse_dist.analysis.scaling_law import _objective, huber, optimal_sparsity_range
from qsparse_dist.analysis.sweep import plan_sweep
from qsparse_dist.cli import main as cli_main
from qsparse_dist.config import ConfigError, config_from_dict, dump_config
from qsparse_dist.config.schema import ModelConfig, MoEConfig, SparsityConfig

ROOT = Path(__file__).resolve().parents[1]
TRUE = ScalingLaw(E=1.7, B=0.05, C=3.0, alpha=0.2, beta=0.1)  # S* ≈ 0.507, away from both ends


def grid_points(law=TRUE, noise=0.0, seed=0):
    N = np.repeat([1e7, 3e7, 1e8, 3e8, 1e9, 3e9], 5)
    S = np.tile([0.0, 0.3, 0.5, 0.7, 0.85], 6)
    L = law.loss(N, S) * np.exp(np.random.default_rng(seed).normal(0.0, noise, len(N)))
    return N, S, L


def brute_force_optimum(law, n_active=1e9):
    s = np.linspace(0.0, 0.999, 199_801)  # step 5e-6
    return float(s[np.argmin(law.loss_at_active(n_active, s))])


# --- the formula ----------------------------------------------------------------------------------

@pytest.mark.parametrize("law", [PAPER_FULL_PRECISION, TRUE, ScalingLaw(2.0, 0.0, 1.0, 0.3, 0.05),
                                 ScalingLaw(1.5, 1.0, 0.5, 0.05, 0.2)])
def test_optimum_matches_brute_force(law):
    s_star = optimal_sparsity(law)
    assert abs(s_star - brute_force_optimum(law)) < 5e-6
    for n_a in (1e6, 1e9, 1e12):  # the optimum does not depend on the activated budget
        assert abs(brute_force_optimum(law, n_a) - s_star) < 5e-6
    if 0 < s_star:  # interior: the stationarity condition C·e^(β/u)(α − β/u) + αB = 0 holds
        u = 1 - s_star
        assert abs(law.C * math.exp(law.beta / u) * (law.alpha - law.beta / u) + law.alpha * law.B) < 1e-6


def test_optimum_at_zero_when_sparsity_never_pays():
    assert optimal_sparsity(ScalingLaw(E=1.5, B=1.0, C=0.5, alpha=0.05, beta=0.2)) == 0.0


def test_paper_constants():
    """The rounded published constants give S* = 50.24%, not the paper's 45.58%; constants that
    round to the published ones span 42.2%–57.4%, which contains it."""
    s_star = optimal_sparsity(PAPER_FULL_PRECISION)
    assert s_star == pytest.approx(0.50238, abs=5e-5)
    assert abs(s_star - 0.4558) > 0.04
    lo, hi = optimal_sparsity_range(PAPER_FULL_PRECISION, 0.005)
    assert lo < 0.4558 < hi
    assert (lo, hi) == pytest.approx((0.4224, 0.5745), abs=5e-4)


def test_law_formulas():
    law = ScalingLaw(E=1.0, B=0.5, C=2.0, alpha=0.5, beta=0.1)
    assert law.A(0.5) == pytest.approx(0.5 + 2.0 * math.exp(0.2))
    assert law.loss(100.0, 0.5) == pytest.approx(1.0 + law.A(0.5) / 10.0)
    # L(N_a, S) is L(N, S) at N = N_a/(1−S)
    assert law.loss_at_active(50.0, 0.5) == pytest.approx(law.loss(100.0, 0.5))


def test_huber_and_gradient():
    assert huber(np.array([5e-4]))[0] == pytest.approx(0.5 * 5e-4**2)
    assert huber(np.array([-2e-3]))[0] == pytest.approx(1e-3 * (2e-3 - 5e-4))
    N, S, L = grid_points(noise=1e-3)
    args = (np.log(N), 1 - S, np.log(L), 1e-3)
    th = np.log([1.5, 0.2, 2.0, 0.15, 0.2])
    _, grad = _objective(th, *args)
    eye = np.eye(5) * 1e-6
    num = [(_objective(th + eye[i], *args)[0] - _objective(th - eye[i], *args)[0]) / 2e-6 for i in range(5)]
    assert np.allclose(grad, num, rtol=1e-5)


# --- fitting --------------------------------------------------------------------------------------

def test_fit_recovers_known_constants_with_noise_and_outliers():
    N, S, L = grid_points(noise=1e-3, seed=1)
    L[[3, 17]] *= 1.05  # two bad runs: the Huber loss keeps them from dragging the fit
    fit = fit_scaling_law(N, S, L, bootstrap=6, seed=0)
    law = fit.law
    assert law.E == pytest.approx(TRUE.E, rel=0.01)
    assert law.alpha == pytest.approx(TRUE.alpha, rel=0.1)
    assert law.beta == pytest.approx(TRUE.beta, rel=0.25)
    assert fit.optimal_sparsity == pytest.approx(optimal_sparsity(TRUE), abs=0.03)
    clean = np.delete(np.arange(len(N)), [3, 17])
    assert np.allclose(law.loss(N[clean], S[clean]), TRUE.loss(N[clean], S[clean]), rtol=4e-3)
    assert fit.bootstrap_samples == 6
    for k in ("E", "alpha", "beta", "optimal_sparsity"):
        lo, hi = fit.ci[k]
        assert lo <= hi
    assert fit.ci["E"][0] <= law.E <= fit.ci["E"][1]
    assert fit.warnings == []


def test_fit_noise_free_paper_constants():
    N, S, L = grid_points(PAPER_FULL_PRECISION)
    fit = fit_scaling_law(N, S, L)
    assert np.allclose(fit.law.loss(N, S), L, rtol=2e-4)
    assert fit.optimal_sparsity == pytest.approx(optimal_sparsity(PAPER_FULL_PRECISION), abs=0.02)


@pytest.mark.parametrize(
    "N, S, L, pattern",
    [
        ([], [], [], "no runs to fit"),
        ([1e6, 1e7, 1e8, 1e9, 1e10], [0.5] * 5, [3, 2.9, 2.8, 2.7, 2.6], "same sparsity S=0.5"),
        ([1e7] * 5, [0, 0.2, 0.4, 0.6, 0.8], [3, 3, 3, 3, 3], "same size"),
        ([1e6, 1e7, 1e8], [0, 0.5, 0.5], [3, 2.9, 2.8], "cannot determine 5 constants"),
        ([1e6, 1e7, 1e8, 1e9, 1e10], [0, 0.5, 1.0, 0, 0.5], [3, 2.9, 2.8, 2.7, 2.6], r"in \[0, 1\)"),
        ([1e6, 1e7, 1e8, 1e9, 1e10], [0, 0.5, 0.5, 0, 0.5], [3, 2.9, -1, 2.7, 2.6], "losses"),
        ([1e6, 1e7], [0, 0.5, 0.5], [3, 2.9, 2.8], "same length"),
    ],
)
def test_bad_inputs(N, S, L, pattern):
    with pytest.raises(ValueError, match=pattern):
        fit_scaling_law(N, S, L)


def test_fit_stays_finite_on_poorly_determined_data():
    """Regression: the tiny CPU sweep (configs/sweep/cpu_tiny.yaml, 80 steps) sent a start to β → ∞
    and math.exp overflowed; the box bounds keep every start finite."""
    runs = [(377472, 0.0, 3.567), (377472, 0.5, 3.6693), (377472, 0.75, 3.7391), (20640, 0.0, 4.3482),
            (20640, 0.5, 4.3311), (20640, 0.75, 4.3492), (106816, 0.0, 3.8652), (106816, 0.5, 3.88),
            (106816, 0.75, 3.9277)]
    N, S, L = (np.array(c, dtype=float) for c in zip(*runs))
    fit = fit_scaling_law(N, S, L, bootstrap=3)
    consts = fit.law.as_dict()
    assert all(math.isfinite(v) and v > 0 for v in consts.values())
    assert consts["E"] <= L.max() and consts["alpha"] <= 3.0 and consts["beta"] <= 20.0
    assert 0.0 <= fit.optimal_sparsity < 1.0


def test_two_sparsity_levels_warn():
    N, S, L = grid_points()
    keep = np.isin(S, [0.0, 0.5])
    fit = fit_scaling_law(N[keep], S[keep], L[keep])
    assert any("not separately identifiable" in w for w in fit.warnings)


# --- N and S from configs -------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    {"num_query_groups": 2, "qkv_bias": True, "tie_embeddings": True},
    {"moe": MoEConfig(num_experts=4, router_topk=2, ffn_hidden_size=48)},
])
def test_count_params_matches_the_reference_model(kw):
    from qsparse_dist.model import QSparseGPT

    m = ModelConfig(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64, **kw)
    model = QSparseGPT(m, SparsityConfig())
    non_embedding = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embed.", "lm_head.")))
    assert count_params(m) == non_embedding


def test_overall_sparsity_is_parameter_weighted_after_rounding():
    m = dict(vocab_size=50, hidden_size=64, num_layers=1, num_attention_heads=4, ffn_hidden_size=128)
    cfg = config_from_dict({"model": m, "sparsity": {"qkv": 0.5, "out": 0.5, "up": 0.25, "down": 0.75}})
    n = projection_params(cfg.model)
    assert n == {"qkv": 64 * 192, "out": 64 * 64, "up": 256 * 64, "down": 128 * 64}
    want = (0.5 * n["qkv"] + 0.5 * n["out"] + 0.25 * n["up"] + 0.75 * n["down"]) / sum(n.values())
    assert overall_sparsity(cfg) == pytest.approx(want)
    assert overall_sparsity(config_from_dict({"model": m, "sparsity": {"linear": "dense"}})) == 0.0
    assert overall_sparsity(config_from_dict({"model": m, "sparsity": {"linear": "bitnet"}})) == 0.0
    # N:M: 8 - floor(0.3·8 + 0.5) = 6 kept of 8 -> 0.25 on every projection
    blk = config_from_dict({"model": m, "sparsity": {"linear": "block_qsparse", "block_size": 8, "qkv": 0.3,
                                                      "out": 0.3, "up": 0.3, "down": 0.3}})
    assert overall_sparsity(blk) == pytest.approx(0.25)
    # rounding on the input dim: 64·0.33 = 21.1 -> 21 dropped of 64
    odd = config_from_dict({"model": m, "sparsity": {"qkv": 0.33, "out": 0.33, "up": 0.33, "down": 0.33}})
    assert overall_sparsity(odd) == pytest.approx((21 / 64 * (n["qkv"] + n["out"] + n["up"]) + 42 / 128 * n["down"])
                                                  / sum(n.values()))


# --- runs on disk, the CLI ------------------------------------------------------------------------

def write_run(run_dir: Path, hidden: int, sparsity: float, law=TRUE, linear="qsparse", steps=20,
              last_step=None, val=True, top_config=False):
    """A run directory as ``qsparse-dist train`` leaves it: metrics.jsonl + checkpoints/latest +
    checkpoints/step_*/config.yaml (or config.yaml at the top)."""
    cfg = config_from_dict({
        "model": {"vocab_size": 64, "hidden_size": hidden, "num_layers": 2, "num_attention_heads": 4},
        "sparsity": {"linear": linear, "qkv": sparsity, "out": sparsity, "up": sparsity, "down": sparsity},
        "train": {"steps": steps, "eval_interval": 10, "run_dir": str(run_dir)},
    })
    loss = float(law.loss(count_params(cfg.model), overall_sparsity(cfg)))
    last_step = steps if last_step is None else last_step
    run_dir.mkdir(parents=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, last_step + 1):
            rec = {"step": step, "loss": loss + 0.01 * (last_step - step), "lr": 1e-3}
            if val and step % 10 == 0:
                rec["val_loss"], rec["val_ppl"] = loss + (last_step - step) * 0.01, math.exp(loss)
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 99, "loss": ')  # a line cut by a kill is ignored
    if top_config:
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    else:
        ck = run_dir / "checkpoints" / f"step_{last_step:08d}"
        ck.mkdir(parents=True)
        (ck / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "checkpoints" / "latest").write_text(ck.name)
    return cfg, loss


@pytest.fixture()
def sweep_dir(tmp_path):
    root = tmp_path / "sweep"
    for hidden in (32, 64, 128, 256):
        for s in (0.0, 0.5, 0.75):
            write_run(root / f"h{hidden}_s{int(100 * s)}", hidden, s, top_config=hidden == 32)
    return root


def test_load_runs_reads_training_layout(sweep_dir):
    points = load_runs([sweep_dir])
    assert len(points) == 12
    p = next(p for p in points if p.run_dir.endswith("h64_s50"))
    cfg = config_from_dict({"model": {"vocab_size": 64, "hidden_size": 64, "num_layers": 2,
                                      "num_attention_heads": 4}})
    assert p.n_params == count_params(cfg.model) and p.step == 20 and p.precision == "fp"
    assert p.sparsity == pytest.approx(0.5)
    assert p.loss == pytest.approx(float(TRUE.loss(p.n_params, 0.5)))  # the last val_loss
    train = load_runs([sweep_dir / "h64_s50"], loss="train")[0]
    assert train.loss == pytest.approx(p.loss + 0.005)  # mean of the last 10% (steps 19, 20)


def test_load_runs_errors(tmp_path):
    with pytest.raises(ValueError, match="no runs found"):
        load_runs([tmp_path])
    with pytest.raises(ValueError, match="no such directory"):
        load_runs([tmp_path / "missing"])
    write_run(tmp_path / "unfinished", 32, 0.5, last_step=10)
    with pytest.raises(ValueError, match=r"unfinished \(step 10 of train.steps=20\)"):
        load_runs([tmp_path / "unfinished"])
    assert load_runs([tmp_path / "unfinished"], allow_unfinished=True)[0].step == 10
    write_run(tmp_path / "noval", 32, 0.5, val=False)
    with pytest.raises(ValueError, match="no val_loss"):
        load_runs([tmp_path / "noval"])
    write_run(tmp_path / "mixed" / "a", 32, 0.5)
    write_run(tmp_path / "mixed" / "b", 32, 0.5, linear="bitnet_qsparse")
    with pytest.raises(ValueError, match="mix full-precision and 1.58-bit"):
        load_runs([tmp_path / "mixed"])
    assert [p.precision for p in load_runs([tmp_path / "mixed"], precision="1.58")] == ["1.58"]
    (tmp_path / "noconf").mkdir()
    (tmp_path / "noconf" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="no config.yaml"):
        load_runs([tmp_path / "noconf"])


def test_cli_end_to_end(sweep_dir, tmp_path, capsys):
    out = tmp_path / "fit"
    rc = cli_main(["fit-scaling-law", "--runs", str(sweep_dir), "--out", str(out), "--bootstrap", "4",
                   "--n-active", "1e5"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "inference-optimal sparsity S*" in text and "12 runs" in text
    report = json.loads((out / "fit.json").read_text())
    assert set(report["constants"]) == {"E", "B", "C", "alpha", "beta"}
    assert report["n_points"] == 12 and report["bootstrap_samples"] == 4
    assert report["huber_objective"] < 1e-3  # noise-free runs: the fit reproduces them
    assert len(json.loads((out / "runs.json").read_text())) == 12
    assert (out / "scaling_law.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors(tmp_path, capsys):
    assert cli_main(["fit-scaling-law", "--runs", str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err
    for hidden in (32, 64, 128, 256, 512):
        write_run(tmp_path / "one" / f"h{hidden}", hidden, 0.5)
    assert cli_main(["fit-scaling-law", "--runs", str(tmp_path / "one"), "--bootstrap", "0"]) == 2
    assert "all runs have the same sparsity" in capsys.readouterr().err
    assert cli_main(["fit-scaling-law"]) == 2
    assert "--runs" in capsys.readouterr().err


def test_cli_paper_check(tmp_path, capsys):
    assert cli_main(["fit-scaling-law", "--paper", "--out", str(tmp_path)]) == 0
    assert "S* from the formula: 50.24%" in capsys.readouterr().out
    assert json.loads((tmp_path / "paper_check.json").read_text())["optimal_sparsity"] == pytest.approx(0.5024, abs=1e-4)


# --- the sweep planner and launcher ---------------------------------------------------------------

@pytest.mark.parametrize("name, runs", [("cpu_tiny.yaml", 9), ("gpu.yaml", 30)])
def test_sweep_files_plan(name, runs, tmp_path):
    base, plan = plan_sweep(ROOT / "configs" / "sweep" / name, tmp_path, ["data.path=/data"])
    assert len(plan) == runs and not any(r.done for r in plan)
    first = config_from_dict(base, list(plan[0].overrides))
    assert first.train.run_dir == str(tmp_path / plan[0].name) and first.data.path == "/data"
    sparsities = {config_from_dict(base, list(r.overrides)).sparsity.up for r in plan}
    assert len(sparsities) >= 3


def test_sweep_plan_errors_and_done(tmp_path):
    base = {"model": {"num_layers": 2, "num_attention_heads": 4}, "train": {"steps": 20}}
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"base": base, "sizes": {"h32": {"model.hidden_size": 32}}, "sparsities": [0.0, 0.5]}))
    _, plan = plan_sweep(f, tmp_path / "out")
    assert [r.name for r in plan] == ["h32_s00", "h32_s50"]
    write_run(tmp_path / "out" / "h32_s50", 32, 0.5)
    assert [r.done for r in plan_sweep(f, tmp_path / "out")[1]] == [False, True]
    for bad, pattern in [
        ({"sizes": {"h": {"model.hidden_size": 30}}, "sparsities": [0.5]}, r"(?s)sweep run h_s50: .*hidden_size=30"),
        ({"sizes": {"h": {}}, "sparsities": [1.0]}, r"not in \[0, 1\)"),
        ({"sizes": {}, "sparsities": [0.5]}, "sizes must map"),
        ({"sizes": {"h": {}}, "sparsities": [0.5], "grid": 1}, "unknown key"),
        ({"base": "missing.yaml", "sizes": {"h": {}}, "sparsities": [0.5]}, "not found"),
    ]:
        f.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=pattern):
            plan_sweep(f, tmp_path / "out")


def test_sweep_launcher_dry_run(tmp_path):
    res = subprocess.run(["bash", str(ROOT / "launch" / "sweep.sh"), "--sweep", str(ROOT / "configs/sweep/cpu_tiny.yaml"),
                          "--out", str(tmp_path), "--dry-run", "--", "train.steps=5"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert any(ln.startswith("+ python -m qsparse_dist.cli prepare-data") for ln in lines)
    trains = [ln for ln in lines if ln.startswith("+ python -m qsparse_dist.cli train")]
    assert len(trains) == 9 and all("train.steps=5" in t and f"data.path={tmp_path}/data" in t for t in trains)
    assert any(ln.startswith("+ python -m qsparse_dist.cli fit-scaling-law") for ln in lines)
