"""Learning-rate and weight-decay schedules as pure functions of the optimizer step.

Stateless on purpose: a resumed run needs only the step number (no scheduler state in the checkpoint).
``t`` = optimizer steps already taken (0 for the first update), ``T`` = ``train.steps``,
``W`` = ``schedule.warmup_steps``, ``η`` = ``optimizer.lr``, ``η_min`` = ``optimizer.min_lr``::

    warmup(t)     = (t + 1) / W  for t < W, else 1
    cos(a, b, u)  = b + (a − b) · ½ (1 + cos(π · clamp(u, 0, 1)))

    constant:          lr = η · warmup(t)
    cosine:            lr = cos(η, η_min, (t − W) / (T − W))  after warmup
    bitnet_two_stage:  T₁ = round(stage_split · T)
                       t <  T₁:  lr = cos(η, η_min, (t − W) / (T₁ − W))  after warmup,  wd = weight_decay
                       t ≥ T₁:  lr = cos(η · stage2_lr_ratio, η_min, (t − T₁) / (T − T₁)),  wd = 0

``bitnet_two_stage`` is BitNet b1.58's recipe ("The Era of 1-bit LLMs: training tips"): a first
cosine cycle at the full peak, then a second, lower-peak cycle with weight decay switched off.
"""

from __future__ import annotations

import math

from ..config.schema import RunConfig

__all__ = ["lr_at", "weight_decay_factor_at", "stage_boundary"]


def _cos(a: float, b: float, u: float) -> float:
    u = min(1.0, max(0.0, u))
    return b + (a - b) * 0.5 * (1.0 + math.cos(math.pi * u))


def stage_boundary(cfg: RunConfig) -> int:
    """``T₁`` of the two-stage schedule (first step of stage 2)."""
    return max(1, round(cfg.schedule.stage_split * cfg.train.steps))


def lr_at(cfg: RunConfig, t: int) -> float:
    s, o, T = cfg.schedule, cfg.optimizer, cfg.train.steps
    W = s.warmup_steps
    if t < W:
        peak = o.lr
        if s.kind == "bitnet_two_stage" and t >= stage_boundary(cfg):
            peak = o.lr * s.stage2_lr_ratio
        return peak * (t + 1) / W
    if s.kind == "constant":
        return o.lr
    if s.kind == "cosine":
        return _cos(o.lr, o.min_lr, (t - W) / max(1, T - W))
    t1 = stage_boundary(cfg)
    if t < t1:
        return _cos(o.lr, o.min_lr, (t - W) / max(1, t1 - W))
    return _cos(o.lr * s.stage2_lr_ratio, o.min_lr, (t - t1) / max(1, T - t1))


def weight_decay_factor_at(cfg: RunConfig, t: int) -> float:
    """Multiplier of ``optimizer.weight_decay`` at step ``t`` (0 in BitNet's second stage)."""
    if cfg.schedule.kind == "bitnet_two_stage" and t >= stage_boundary(cfg):
        return 0.0
    return 1.0
