"""``train(cfg)``: preflight → process groups → model → DeepSpeed → resume → steps → metrics/checkpoints.

Everything that can be wrong with the config or the data is checked in :func:`preflight` *before*
any process group, model or file is created (errors are :class:`~qsparse_dist.config.ConfigError`
naming the field).  Step ``t`` (0-based) trains on :class:`~qsparse_dist.data.StepSampler`'s batch
``t``; a checkpoint taken after ``N`` steps records ``step = N`` and resuming continues with batch
``N`` and the saved RNG states, so a killed-and-resumed run reproduces the uninterrupted losses.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..compat import CompatError
from ..config import ConfigError, RunConfig, rules
from ..data import DataError, SampleDataset, StepSampler, TokenFile, eval_batches, read_meta
from .checkpoint import (
    CheckpointError,
    checkpoint_root,
    list_checkpoints,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from .ds_config import BatchPlan, batch_plan, build_ds_config
from .engine import Runtime, build_runtime, init_distributed, preflight_parallel
from .metrics import FLOPS_FORMULA, MetricsWriter, flops_per_token, peak_flops_per_device, summarize_sparsity
from .resume import agree_on_resume

__all__ = ["Prepared", "preflight", "train", "world_size_from_env"]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Prepared:
    cfg: RunConfig
    plan: BatchPlan
    data_meta: dict
    train_tokens: TokenFile
    valid_tokens: TokenFile | None
    ds_config: dict


def _fill_vocab(cfg: RunConfig, data_meta: dict) -> None:
    tok_vocab = int(data_meta["vocab_size"])
    tp = cfg.parallel.tp
    rules.check_vocab(cfg, tok_vocab)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = -(-tok_vocab // tp) * tp  # round up so TP divides the vocab


def preflight(cfg: RunConfig, world_size: int | None = None) -> Prepared:
    """All config/data checks; no side effects beyond reading files."""
    world = world_size or world_size_from_env()
    cfg = cfg.model_copy(deep=True)
    try:
        from ..data.sft import SFTDataset, is_sft_dir, read_sft_meta

        sft = is_sft_dir(cfg.data.path)  # SFT rows (qsparse_dist.data.sft) instead of a token stream
        rules.check_sft_layout(cfg, sft)
        data_meta = read_sft_meta(cfg.data.path) if sft else read_meta(cfg.data.path, field="data.path")
        _fill_vocab(cfg, data_meta)
        plan = batch_plan(cfg, world)
        try:
            rules.check_world(cfg.parallel, world)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        preflight_parallel(cfg)
        ds_config = build_ds_config(cfg, plan)  # the deepspeed: section, checked by DeepSpeed's parser too
        train_tokens = (SFTDataset(cfg.data.path, "train", with_attention_mask=False) if sft
                        else TokenFile(cfg.data.path, "train"))
        S = cfg.model.seq_length
        if train_tokens.num_samples(S) < 1:
            raise ConfigError(f"data.path={cfg.data.path}: the train split has {len(train_tokens)} tokens, fewer "
                              f"than model.seq_length + 1 = {S + 1}")
        valid_tokens = None
        if cfg.train.eval_interval:
            rules.check_eval_split(cfg, data_meta["splits"])
            valid_tokens = (SFTDataset(cfg.data.path, "valid", with_attention_mask=False) if sft
                            else TokenFile(cfg.data.path, "valid"))
            if valid_tokens.num_samples(S) < 1:
                raise ConfigError(f"train.eval_interval: the valid split of data.path={cfg.data.path} has "
                                  f"{len(valid_tokens)} tokens, fewer than model.seq_length + 1 = {S + 1}")
    except DataError as e:
        raise ConfigError(str(e)) from None
    root = checkpoint_root(cfg)
    rules.check_checkpoint_options(cfg, has_checkpoints=bool(list_checkpoints(root)))
    if cfg.checkpoint.init_from:
        from ..convert.imported import load_imported

        load_imported(cfg.checkpoint.init_from, cfg.model)  # raises ConfigError naming the field
    return Prepared(cfg, plan, data_meta, train_tokens, valid_tokens, ds_config)


def _as_dataset(split, seq_length: int) -> torch.utils.data.Dataset:
    """Token stream → ``seq_length + 1`` windows; SFT rows (already a Dataset of dicts) as they are."""
    return split if isinstance(split, torch.utils.data.Dataset) else SampleDataset(split, seq_length)


class _StepBatches:
    """``batch_sampler`` for a DataLoader: this rank's micro-batches of steps ``[start, end)``."""

    def __init__(self, sampler: StepSampler, start: int, end: int) -> None:
        self.sampler, self.start, self.end = sampler, start, end

    def __iter__(self):
        return self.sampler.micro_batches(self.start, self.end)

    def __len__(self) -> int:
        return (self.end - self.start) * self.sampler.accum


def _init_from_import(rt_model, cfg: RunConfig) -> None:
    """``checkpoint.init_from``: this rank's (TP, PP, EP) shard of an ``import-hf`` directory's
    reference weights (:func:`qsparse_dist.convert.megatron_load.load_imported_into_megatron`)."""
    from ..convert.megatron_load import load_imported_into_megatron

    load_imported_into_megatron(rt_model, cfg)


def _gather_over_pipeline(obj: dict, rt: Runtime) -> dict:
    if rt.cfg.parallel.pp == 1:
        return obj
    from megatron.core import parallel_state as ps

    parts: list[dict] = [None] * rt.cfg.parallel.pp  # type: ignore[list-item]
    dist.all_gather_object(parts, obj, group=ps.get_pipeline_model_parallel_group())
    out: dict = {}
    for p in parts:
        out.update(p)
    return out


def _expert_load(rt: Runtime) -> dict:
    from megatron.core import parallel_state as ps

    from ..model.megatron.gpt import collect_expert_load

    load = collect_expert_load(rt.module)
    counts = {k: v for k, v in load.items() if k.endswith("tokens_per_expert")}
    if counts and ps.get_data_parallel_world_size() > 1:
        keys = sorted(counts)
        t = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=rt.engine.device)
        dist.all_reduce(t, group=ps.get_data_parallel_group())
        counts = dict(zip(keys, t.cpu().tolist()))
    out = {}
    for k, v in counts.items():
        layer = k.rsplit(".", 1)[0]
        mean = sum(v) / len(v)
        out[k] = v
        out[f"{layer}.load_imbalance"] = max(v) / mean if mean > 0 else 0.0
    return _gather_over_pipeline(out, rt)


def train(cfg: RunConfig, *, teardown: bool = True) -> dict:
    """Run (or resume) training; every rank calls it.  Returns a summary (same on all ranks for the
    loss fields)."""
    from ..model.megatron.gpt import collect_sparsity_stats, set_track_sparsity
    from .sparsity_ramp import SparsityRamp

    prep = preflight(cfg)
    cfg, plan = prep.cfg, prep.plan
    rank, world = init_distributed(cfg.parallel.dist_timeout_s)
    root = checkpoint_root(cfg)
    rt = None
    peer_lost = False
    try:  # every error from here on leaves through the teardown below (and, in the CLI, exit 2)
        if rank == 0:
            Path(cfg.train.run_dir).mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(root)
        # agreed by all ranks, verified, and checked against the config before any model is built
        resume_from = agree_on_resume(cfg, root, world, plan.global_batch)
        init_fn = None
        if resume_from is None and cfg.checkpoint.init_from:
            def init_fn(model):
                _init_from_import(model, cfg)
        rt = build_runtime(cfg, plan, init_weights=init_fn)
        return _run(rt, prep, resume_from, collect_sparsity_stats, set_track_sparsity, SparsityRamp)
    except RuntimeError as e:
        if rt is not None and not isinstance(e, (CheckpointError, CompatError)):
            # a collective failed: a peer process or host is gone
            peer_lost = True
            e.qsd_peer_lost = True
            _report_peer_loss(e, rank, root)
        raise
    finally:
        # after a failed collective, shutdown's barrier would block another dist_timeout_s and bury
        # the first error under a second one: skip the teardown, the process is ending anyway
        if teardown and rt is not None and not peer_lost:
            shutdown(rt)


def _report_peer_loss(e: BaseException, rank: int, root: Path) -> None:
    """One clear line on this rank's stderr (docs/multinode.md, "When a host dies")."""
    import socket
    import sys

    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    found = list_checkpoints(root)
    last = found[-1] if found else None
    print(f"qsparse-dist train: error: rank {rank} on {socket.gethostname()}: a collective failed, a peer "
          f"process or host is probably gone ({type(e).__name__}: {first}). Stopping; relaunch to resume from "
          f"the last checkpoint ({last or 'none yet'}).", file=sys.stderr, flush=True)


def shutdown(rt: Runtime) -> None:
    """Release DeepSpeed's and megatron's global state (torch.distributed stays up) so another
    ``train()`` may follow in this process."""
    from ..compat.deepspeed import clear_expert_groups
    from ..parallel import destroy_parallel

    dist.barrier()
    rt.engine.destroy()
    clear_expert_groups()
    destroy_parallel()


def _run(rt: Runtime, prep: Prepared, resume_from: Path | None, collect_sparsity_stats, set_track_sparsity,
         SparsityRamp) -> dict:
    cfg, plan = rt.cfg, rt.plan
    S = cfg.model.seq_length
    start = 0
    resumed_from = None
    if resume_from is not None:
        meta = load_checkpoint(rt, resume_from, verify=False)
        start, resumed_from = int(meta["step"]), str(resume_from)

    # ---- data ----------------------------------------------------------------------------------
    sampler = StepSampler(prep.train_tokens.num_samples(S), plan.global_batch, plan.micro, plan.dp,
                          rt.dp_rank, cfg.train.seed)
    loader = torch.utils.data.DataLoader(_as_dataset(prep.train_tokens, S),
                                         batch_sampler=_StepBatches(sampler, start, cfg.train.steps),
                                         num_workers=cfg.data.num_workers)
    batches = iter(loader)
    valid = None
    if prep.valid_tokens is not None:
        vds = _as_dataset(prep.valid_tokens, S)
        valid = [torch.utils.data.default_collate([vds[i] for i in ids])
                 for ids in eval_batches(len(vds), cfg.train.eval_iters, plan.micro, plan.dp, rt.dp_rank)]

    # ---- metrics -------------------------------------------------------------------------------
    writer = MetricsWriter(Path(cfg.train.run_dir), enabled=rt.rank == 0, start_step=start,
                           total_steps=cfg.train.steps, tensorboard=cfg.logging.tensorboard,
                           progress_bar=cfg.logging.progress_bar, log_interval=cfg.train.log_interval)
    f_token = flops_per_token(cfg)
    peak, peak_src = peak_flops_per_device(cfg, cfg.logging.peak_tflops) if rt.rank == 0 else (0.0, "")
    writer.text(f"qsparse-dist train: world {rt.world} = dp {plan.dp} × tp {cfg.parallel.tp} × pp "
                f"{cfg.parallel.pp} (ep {cfg.parallel.ep}), ZeRO-{cfg.parallel.zero_stage}, {cfg.train.dtype}, "
                f"global batch {plan.global_batch} × {S} tokens (micro {plan.micro}, accum {plan.accum}); "
                + (f"resumed from {resumed_from} at step {start}" if resumed_from else "from scratch"))
    writer.text(f"model FLOPs/token {f_token:.3e} ({FLOPS_FORMULA}); peak/device {peak / 1e12:.3f} TFLOP/s "
                f"({peak_src})")
    ramp = SparsityRamp(rt.module, cfg.sparsity.ramp_steps)

    def log_step(step: int) -> bool:  # sparsity statistics cost a pass over every linear input
        return step % cfg.train.log_interval == 0 or step == cfg.train.steps or step == start + 1

    tokens_per_step = plan.global_batch * S
    last = None
    last_saved = start if resumed_from else None
    for t in range(start, cfg.train.steps):
        ramp_frac = ramp.apply(t)
        micro = [next(batches) for _ in range(plan.accum)]
        set_track_sparsity(rt.module, log_step(t + 1))
        t0 = time.perf_counter()
        res = rt.train_step(t, micro)
        dt = time.perf_counter() - t0
        step = t + 1
        layers = _gather_over_pipeline(collect_sparsity_stats(rt.module), rt) if log_step(step) else None
        rec = {
            "step": step, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
            "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
            "tokens": step * tokens_per_step, "consumed_samples": sampler.consumed_samples(step),
            "model_tflops": f_token * tokens_per_step / dt / 1e12,
            "mfu": (f_token * tokens_per_step / dt) / (peak * rt.world) if peak else None,
            "weight_decay": cfg.optimizer.weight_decay * res.weight_decay_factor,
        }
        if layers is not None:
            rec["sparsity"], rec["sparsity_layers"] = summarize_sparsity(layers), layers
        if ramp.active:
            rec["sparsity_ramp"] = ramp_frac
        if cfg.model.moe is not None:
            rec["moe"] = _expert_load(rt)
        if valid is not None and (step % cfg.train.eval_interval == 0 or step == cfg.train.steps):
            set_track_sparsity(rt.module, False)
            vl = rt.evaluate(valid)
            rec["val_loss"], rec["val_ppl"] = vl, math.exp(min(vl, 50.0))
        if not math.isfinite(res.loss):
            writer.log(rec)
            raise FloatingPointError(f"loss became {res.loss} at step {step}")
        writer.log(rec)
        last = rec
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or step == cfg.train.steps:
            path = save_checkpoint(rt, step, consumed_samples=sampler.consumed_samples(step),
                                   data_meta=prep.data_meta)
            last_saved = step
            writer.text(f"checkpoint {path}")
    if last_saved != cfg.train.steps and start < cfg.train.steps:
        save_checkpoint(rt, cfg.train.steps, consumed_samples=sampler.consumed_samples(cfg.train.steps),
                        data_meta=prep.data_meta)
    writer.close()
    return {"steps": cfg.train.steps, "start_step": start, "resumed_from": resumed_from,
            "final_loss": None if last is None else last["loss"], "run_dir": str(cfg.train.run_dir),
            "vocab_size": cfg.model.vocab_size}
