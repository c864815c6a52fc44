"""Shared by the training tests and their workers: the tiny model, scenario overrides, reference init."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 64, "seq_length": 32},
    "sparsity": {"linear": "qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "data": {"micro_batch_size": 2, "global_batch_size": 8},
    "optimizer": {"lr": 3.0e-3, "min_lr": 3.0e-4, "grad_clip": 0.5},
    "schedule": {"kind": "cosine", "warmup_steps": 1},
    "train": {"steps": 4, "log_interval": 100, "seed": 7},
    "checkpoint": {"interval": 0, "keep_last": 2},
    "logging": {"progress_bar": False, "tensorboard": False, "peak_tflops": 1.0},
}
MOE = {"num_experts": 4, "router_topk": 2, "aux_loss_coeff": 0.0}
# ``moeaux_*`` scenarios: the same MoE with the Switch load-balancing loss on (its gradient reaches the
# router through megatron's ``MoEAuxLossAutoScaler``; strong enough to change the trajectory)
MOE_AUX = {**MOE, "aux_loss_coeff": 0.5}

# name -> overrides (all start from the same reference weights through checkpoint.init_from)
SCENARIOS: dict[str, list[str]] = {
    "single": [],
    **{f"dp2_z{z}": [f"parallel.zero_stage={z}"] for z in range(4)},
    **{f"tp2_z{z}": ["parallel.tp=2", f"parallel.zero_stage={z}"] for z in range(4)},
    "tp2_sp_z2": ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=2"],
    **{f"pp2_z{z}": ["parallel.pp=2", f"parallel.zero_stage={z}"] for z in range(2)},
    "moe_single": [],
    **{f"moe_ep2_z{z}": ["parallel.ep=2", f"parallel.zero_stage={z}"] for z in range(3)},
    "moe_dp2_z3": ["parallel.zero_stage=3"],
    "moe_tp2_sp_z0": ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=0"],
    "moe_tp2_sp_z1": ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=1"],
    "moeaux_single": [],
    "moeaux_dp2_z0": ["parallel.zero_stage=0"],
    "moeaux_dp2_z3": ["parallel.zero_stage=3"],
    "moeaux_ep2_z1": ["parallel.ep=2", "parallel.zero_stage=1"],
    "moeaux_ep2_z2": ["parallel.ep=2", "parallel.zero_stage=2"],
    "moeaux_tp2_sp_z0": ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=0"],
    "moeaux_tp2_sp_z1": ["parallel.tp=2", "parallel.sp=true", "parallel.zero_stage=1"],
    "moeaux_pp2_z1": ["parallel.pp=2", "parallel.zero_stage=1"],
}


def family(name: str) -> str:
    """The model a scenario trains: ``dense``, ``moe`` (no aux loss) or ``moeaux`` (aux loss on)."""
    return "moeaux" if name.startswith("moeaux") else "moe" if name.startswith("moe") else "dense"


FAMILIES = ("dense", "moe", "moeaux")


def scenario_dict(name: str, data_dir: str, run_dir: str, init_dir: str | None) -> tuple[dict, list[str]]:
    import copy

    d = copy.deepcopy(TINY)
    d["data"]["path"] = data_dir
    d["train"]["run_dir"] = run_dir
    if family(name) != "dense":
        d["model"]["moe"] = dict(MOE_AUX if family(name) == "moeaux" else MOE)
    if init_dir:
        d["checkpoint"]["init_from"] = init_dir
    return d, SCENARIOS[name]


def write_reference_init(out: Path, data_dir: str, model_family: str, seed: int = 11) -> Path:
    """An ``import-hf``-style directory (config.yaml + model.safetensors) holding freshly initialized
    reference-model weights of ``model_family`` (:data:`FAMILIES`): every parallel layout loads them, so
    all start from the same function (``moe`` and ``moeaux`` get the same weights: the aux loss adds none)."""
    from safetensors.torch import save_file

    from qsparse_dist.config import config_from_dict, dump_config
    from qsparse_dist.model import QSparseGPT

    vocab = json.loads((Path(data_dir) / "meta.json").read_text())["vocab_size"]
    d, _ = scenario_dict({"dense": "single", "moe": "moe_single", "moeaux": "moeaux_single"}[model_family],
                         data_dir, "unused", None)
    d["model"]["vocab_size"] = vocab
    cfg = config_from_dict(d)
    torch.manual_seed(seed)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.yaml").write_text(dump_config(cfg))
    return out


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
