"""Training config → schedules, DeepSpeed JSON, refusals; config fuzz; checkpoint verification and
pickle safety (single process, no process group)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qsparse_dist.cli import main as cli_main
from qsparse_dist.config import ConfigError, config_from_dict
from qsparse_dist.data import prepare_data
from qsparse_dist.train.checkpoint import CheckpointError, safe_torch_load, verify_checkpoint
from qsparse_dist.train.ds_config import NO_CLIP, batch_plan, build_ds_config
from qsparse_dist.train.loop import preflight
from qsparse_dist.train.schedules import lr_at, stage_boundary, weight_decay_factor_at
from tests.corpus import write_corpus


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    src = write_corpus(tmp_path_factory.mktemp("c") / "c.txt", 60_000)
    out = tmp_path_factory.mktemp("d") / "data"
    prepare_data([str(src)], out, vocab_size=320, valid_fraction=0.05, log=lambda *a: None)
    return str(out)


def _cfg(data_dir, **over):
    d = {"model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 64,
                   "seq_length": 32},
         "data": {"path": data_dir, "micro_batch_size": 2}, "train": {"steps": 100}}
    return config_from_dict(d, [f"{k}={v}" for k, v in over.items()])


def test_schedules(data_dir):
    c = _cfg(data_dir, **{"schedule.warmup_steps": 10, "optimizer.lr": 1.0, "optimizer.min_lr": 0.1})
    assert lr_at(c, 0) == pytest.approx(0.1) and lr_at(c, 9) == pytest.approx(1.0)
    assert lr_at(c, 10) == pytest.approx(1.0) and lr_at(c, 99) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(c, 55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    b = _cfg(data_dir, **{"schedule.kind": "bitnet_two_stage", "schedule.stage_split": 0.5,
                          "schedule.stage2_lr_ratio": 0.4, "optimizer.lr": 1.0, "optimizer.min_lr": 0.0})
    t1 = stage_boundary(b)
    assert t1 == 50
    assert lr_at(b, t1 - 1) < 0.01 and lr_at(b, t1) == pytest.approx(0.4)  # second, lower peak
    assert weight_decay_factor_at(b, t1 - 1) == 1.0 and weight_decay_factor_at(b, t1) == 0.0
    assert weight_decay_factor_at(c, 99) == 1.0


def test_deepspeed_json_and_batch_plan(data_dir):
    c = _cfg(data_dir, **{"data.global_batch_size": 16, "parallel.tp": 2, "parallel.zero_stage": 2,
                          "train.dtype": "bf16", "optimizer.grad_clip": 0})
    plan = batch_plan(c, world_size=8)
    assert (plan.dp, plan.micro, plan.accum, plan.global_batch) == (4, 2, 2, 16)
    ds = build_ds_config(c, plan)
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 2 and ds["bf16"]["enabled"] and ds["gradient_clipping"] == NO_CLIP
    pp = _cfg(data_dir, **{"data.global_batch_size": 16, "parallel.pp": 2})
    ds = build_ds_config(pp, batch_plan(pp, 4))  # 1F1B runs the 4 micro-batches inside one DeepSpeed step
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_micro_batch_size_per_gpu"] == 8
    user = _cfg(data_dir, **{"deepspeed": "{zero_optimization: {reduce_bucket_size: 1000}, wall_clock_breakdown: true}"})
    ds = build_ds_config(user, batch_plan(user, 1))
    assert ds["zero_optimization"] == {"stage": 0, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert ds["wall_clock_breakdown"] is True
    for bad, field in [({"deepspeed": "{train_batch_size: 3}"}, "deepspeed.train_batch_size"),
                       ({"deepspeed": "{zero_optimization: {stage: 3}}"}, "deepspeed.zero_optimization.stage"),
                       ({"data.global_batch_size": 5}, "data.global_batch_size"),
                       ({"parallel.num_microbatches": 3, "parallel.pp": 2}, "parallel.num_microbatches")]:
        c = _cfg(data_dir, **bad)
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            build_ds_config(c, batch_plan(c, 2))


@pytest.mark.parametrize("over,world,field", [
    ({"parallel.pp": 2, "parallel.zero_stage": 2}, 2, "parallel.zero_stage=2 with parallel.pp=2"),
    ({"parallel.pp": 2, "model.tie_embeddings": True}, 2, "model.tie_embeddings"),
    ({"model.moe": "{num_experts: 4}", "parallel.ep": 2, "parallel.zero_stage": 3}, 2, "parallel.zero_stage=3"),
    ({"model.moe": "{num_experts: 4}", "parallel.tp": 2}, 2, "parallel.sp must be true"),
    ({"parallel.tp": 2}, 3, "does not divide the world size 3"),
    ({"model.vocab_size": 100}, 1, "model.vocab_size=100 is smaller"),
    ({"model.seq_length": 100000}, 1, "model.seq_length"),
    ({"data.path": "/nonexistent/x"}, 1, "data.path=/nonexistent/x"),
    ({"checkpoint.init_from": "/nonexistent/imp"}, 1, "checkpoint.init_from"),
    # the deepspeed: section is validated here too, before any model is built (issue 14, 4g)
    ({"deepspeed": "{train_batch_size: 3}"}, 1, "deepspeed.train_batch_size=3"),
    ({"deepspeed": "{zero_optimization: {stage: 2}}"}, 1, "deepspeed.zero_optimization.stage=2"),
    ({"deepspeed": "{fp16: {enabled: true}}"}, 1, "deepspeed.fp16.enabled"),
    ({"deepspeed": "{bf16: {enabled: true}}"}, 1, "deepspeed.bf16.enabled=True disagrees with train.dtype=fp32"),
    ({"deepspeed": "{bf16: {enabled: false}}", "train.dtype": "bf16", "parallel.zero_stage": 1}, 1,
     "deepspeed.bf16.enabled=False"),
    ({"deepspeed": "{gradient_clipping: 2.0}"}, 1, "deepspeed.gradient_clipping"),
    ({"deepspeed": "{scheduler: {type: WarmupLR}}"}, 1, "deepspeed.scheduler"),
    ({"deepspeed": "{zero_optimization: 1}"}, 1, "deepspeed.zero_optimization must be a mapping"),
    ({"deepspeed": "{zero_optimization: {stage: 0, reduce_bucket_siz: 5}}"}, 1,
     "deepspeed.zero_optimization.reduce_bucket_siz"),  # DeepSpeed's own parser, run in preflight
    ({"deepspeed": "{zero_optimization: {offload_optimizer: {device: gpu}}}"}, 1,
     "deepspeed.zero_optimization.offload_optimizer.device"),
])
def test_refusals_name_the_field(data_dir, over, world, field):
    with pytest.raises(ConfigError) as e:
        preflight(_cfg(data_dir, **over), world_size=world)
    assert field in str(e.value)


def test_preflight_fills_vocab_and_moe_ep1_zero3_is_allowed(data_dir):
    prep = preflight(_cfg(data_dir, **{"parallel.tp": 2, "parallel.sp": True}), world_size=2)
    assert prep.cfg.model.vocab_size == 320 and prep.plan.dp == 1
    prep = preflight(_cfg(data_dir, **{"model.moe": "{num_experts: 4}", "parallel.zero_stage": 3}), world_size=2)
    assert prep.plan.dp == 2


def test_dry_run_cli(data_dir, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"data": {"path": data_dir}, "model": {"seq_length": 32}}))
    assert cli_main(["train", "--config", str(f), "--dry-run", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert '"train_batch_size": 4' in out
    assert cli_main(["train", "--config", str(f), "--dry-run", "parallel.zero_stage=7"]) == 2
    assert "parallel.zero_stage" in capsys.readouterr().err
    # a conflict in the deepspeed: section: refused, and no "ok:" line before the error (issue 14, 4g)
    assert cli_main(["train", "--config", str(f), "--dry-run", "deepspeed={train_batch_size: 5}"]) == 2
    out, err = capsys.readouterr()
    assert "ok:" not in out and out.strip() == "" and "deepspeed.train_batch_size=5" in err


_SECTIONS = {
    "model": {"hidden_size": st.integers(-4, 96), "num_layers": st.integers(-1, 4),
              "num_attention_heads": st.integers(0, 8), "seq_length": st.integers(-2, 64),
              "ffn_activation": st.sampled_from(["relu2glu", "gelu", "swiglu", 3]),
              "moe": st.one_of(st.none(), st.fixed_dictionaries({"num_experts": st.integers(0, 5)})),
              "vocab_siz": st.integers()},
    "parallel": {"tp": st.integers(0, 3), "pp": st.integers(0, 3), "ep": st.integers(0, 3),
                 "zero_stage": st.integers(-1, 4), "sp": st.booleans()},
    "data": {"path": st.sampled_from(["DATA", "/nope", 5]), "micro_batch_size": st.integers(-1, 4),
             "global_batch_size": st.one_of(st.none(), st.integers(-1, 9))},
    "optimizer": {"lr": st.one_of(st.floats(-1, 1), st.just(float("nan"))), "grad_clip": st.floats(-1, 2)},
    "schedule": {"kind": st.sampled_from(["cosine", "bitnet_two_stage", "linear"]),
                 "stage_split": st.floats(-0.5, 1.5)},
    "train": {"steps": st.integers(-1, 3), "dtype": st.sampled_from(["fp32", "bf16", "fp8"])},
    "deepspeed": st.one_of(st.none(), st.just({"train_batch_size": 3}), st.just([1, 2])),
}


def _config_docs():
    def section(name, fields):
        if not isinstance(fields, dict):
            return fields
        return st.dictionaries(st.sampled_from(sorted(fields)), st.none(), max_size=len(fields)).flatmap(
            lambda keys: st.fixed_dictionaries({k: fields[k] for k in keys}))

    top = st.dictionaries(st.sampled_from(sorted(_SECTIONS)), st.none(), max_size=len(_SECTIONS)).flatmap(
        lambda keys: st.fixed_dictionaries({k: section(k, _SECTIONS[k]) for k in keys}))
    garbage = st.one_of(st.text(max_size=30), st.lists(st.integers(), max_size=3), st.integers())
    return st.one_of(top, top, top, garbage)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_config_docs(), world=st.sampled_from([1, 2, 4]))
def test_config_fuzz_never_tracebacks(data_dir, tmp_path, doc, world, capsys):
    """Random (often invalid) config files through `qsparse-dist train --dry-run`: exit 0 or 2 with a
    message, never an exception."""
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict) and doc["data"].get("path") == "DATA":
        doc["data"]["path"] = data_dir
    f = tmp_path / "fuzz.yaml"
    f.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    os.environ["WORLD_SIZE"] = str(world)
    try:
        rc = cli_main(["train", "--config", str(f), "--dry-run"])
    finally:
        os.environ.pop("WORLD_SIZE", None)
    err = capsys.readouterr().err
    assert rc in (0, 2)
    if rc == 2:
        assert err.startswith("qsparse-dist train: ") and len(err) > 30


def test_schedule_changes_name_the_fields_that_bend_the_remaining_curve(data_dir):
    from qsparse_dist.train.resume import schedule_changes

    old = _cfg(data_dir).model_dump(mode="json")  # cosine over 100 steps
    assert schedule_changes(old, _cfg(data_dir), 40) == []
    assert schedule_changes(old, _cfg(data_dir, **{"train.steps": 200}), 40) == ["train.steps (checkpoint 100, now 200)"]
    got = schedule_changes(old, _cfg(data_dir, **{"optimizer.min_lr": 1e-6, "schedule.warmup_steps": 5}), 40)
    assert got == ["schedule.warmup_steps (checkpoint 0, now 5)", "optimizer.min_lr (checkpoint 3e-05, now 1e-06)"]
    # a constant schedule run for longer, or a warmup change in the past, leave the remaining curve alone
    const = _cfg(data_dir, **{"schedule.kind": "constant"}).model_dump(mode="json")
    assert schedule_changes(const, _cfg(data_dir, **{"schedule.kind": "constant", "train.steps": 300}), 40) == []
    two = _cfg(data_dir, **{"schedule.kind": "bitnet_two_stage"})
    assert schedule_changes(two.model_dump(mode="json"), _cfg(data_dir, **{"schedule.kind": "bitnet_two_stage",
                                                                          "train.steps": 300}), 40)
    assert schedule_changes(const, _cfg(data_dir, **{"schedule.kind": "constant", "schedule.warmup_steps": 10}),
                            40) == []


def test_verify_detects_corruption_and_missing_files(tmp_path):
    from qsparse_dist.train.checkpoint import FORMAT, _hash_files

    ck = tmp_path / "checkpoints" / "step_00000002"
    (ck / "sub").mkdir(parents=True)
    (ck / "sub" / "a.bin").write_bytes(b"x" * 100)
    (ck / "meta.json").write_text("{}")
    files = ["meta.json", "sub/a.bin"]
    (ck / "manifest.json").write_text(json.dumps({"format": FORMAT, "files": _hash_files(ck, files, False)}))
    older = tmp_path / "checkpoints" / "step_00000001"
    older.mkdir()
    (older / "manifest.json").write_text("{}")
    verify_checkpoint(ck)
    with open(ck / "sub" / "a.bin", "r+b") as f:
        f.seek(50)
        f.write(b"y")
    with pytest.raises(CheckpointError, match=r"sub/a.bin: sha256 mismatch.*checkpoint.load=step_00000001"):
        verify_checkpoint(ck)
    (ck / "sub" / "a.bin").unlink()
    with pytest.raises(CheckpointError, match="sub/a.bin: missing"):
        verify_checkpoint(ck)
    (ck / "manifest.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="manifest.json unreadable"):
        verify_checkpoint(ck)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_safe_load_refuses_code_even_when_caller_asks_for_full_unpickling(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": torch.ones(2), "evil": _Evil()}, p)
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        with safe_torch_load():
            torch.load(p, weights_only=False)  # what DeepSpeed 0.19 passes
    ok = tmp_path / "ok.pt"
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save({"x": torch.ones(2), "stage": ZeroStageEnum.gradients, "shapes": [torch.Size([2])]}, ok)
    with safe_torch_load():
        d = torch.load(ok, weights_only=False)
    assert d["stage"] == ZeroStageEnum.gradients
