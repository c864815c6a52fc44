"""The Q-Sparse scaling law for sparsely-activated models (Wang et al., arXiv 2407.10969, §3):

    L(N, S) = E + A(S) / N^α,        A(S) = B + C · exp(β / (1 − S))

with ``N`` the (non-embedding) parameter count and ``S`` the activation sparsity.  With the activated
parameter count ``N_a = N · (1 − S)`` this reads

    L(N_a, S) = E + A(S) · ((1 − S) / N_a)^α = E + N_a^(−α) · g(S),    g(S) = A(S) · (1 − S)^α,

so for a fixed inference budget ``N_a`` the best sparsity minimises ``g`` — and ``S*`` does **not**
depend on ``N_a`` (only the loss reached there does).  Setting ``g'(S) = 0`` with ``u = 1 − S`` gives
``C·e^(β/u)·(α − β/u) + α·B = 0``, i.e. ``S* ≈ 1 − β/α`` when ``B ≪ C``.

Fitting (Chinchilla's recipe, Hoffmann et al. 2022, App. D.2): minimise the Huber loss (δ = 1e-3)
of the residuals ``log L̂ − log L`` with L-BFGS from a grid of starting points and keep the best
(the whole grid is scored first and L-BFGS runs from its best points, which saves most of the time).
The constants are fitted in log-space, ``θ = (log E, log B, log C, log α, log β)``, which keeps all
five positive and lets the prediction be computed without overflow as

    log L̂ = logaddexp(log E, logaddexp(log B, log C + β/(1 − S)) − α · log N).

The Huber sum is divided by δ² (``Σ huber_1(r/δ)``: same minimiser) so that L-BFGS's gradient
tolerance is meaningful at residuals of 1e-3.  L-BFGS-B runs inside a wide box (:func:`theta_bounds`)
so that a start on a poorly-determined direction (e.g. β with few sparsity levels) cannot walk to
overflow.  Confidence intervals come from a bootstrap over runs
(resample with replacement, refit from the best starts, percentile interval).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "HUBER_DELTA",
    "PAPER_FULL_PRECISION",
    "ScalingLaw",
    "FitResult",
    "fit_scaling_law",
    "optimal_sparsity",
    "optimal_sparsity_range",
    "huber",
    "check_points",
]

HUBER_DELTA = 1e-3
CONSTANTS = ("E", "B", "C", "alpha", "beta")


@dataclass(frozen=True)
class ScalingLaw:
    """The five constants of ``L(N, S) = E + (B + C·exp(β/(1−S))) / N^α``."""

    E: float
    B: float
    C: float
    alpha: float
    beta: float

    def A(self, S):  # noqa: N802 - the paper's name
        S = np.asarray(S, dtype=float)
        return self.B + self.C * np.exp(self.beta / (1.0 - S))

    def loss(self, N, S):
        """``L(N, S)`` for total (non-embedding) parameters ``N``."""
        return self.E + self.A(S) / np.asarray(N, dtype=float) ** self.alpha

    def loss_at_active(self, N_a, S):  # noqa: N803
        """``L(N_a, S) = E + A(S)·((1 − S)/N_a)^α`` for activated parameters ``N_a = N(1 − S)``."""
        S = np.asarray(S, dtype=float)
        return self.E + self.A(S) * ((1.0 - S) / np.asarray(N_a, dtype=float)) ** self.alpha

    def optimal_sparsity(self, s_max: float = 0.999) -> float:
        return optimal_sparsity(self, s_max)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


PAPER_FULL_PRECISION = ScalingLaw(E=1.86, B=0.01, C=1.89, alpha=0.10, beta=0.05)
"""The full-precision constants as printed in the Q-Sparse paper (rounded to two decimals)."""


def optimal_sparsity(law: ScalingLaw, s_max: float = 0.999) -> float:
    """``argmin_S A(S)·(1 − S)^α`` on ``[0, s_max]`` (independent of the budget ``N_a``).

    A grid of 20 001 points brackets the minimum, bounded Brent refines it inside the bracket.
    """
    from scipy.optimize import minimize_scalar

    if not 0.0 < s_max < 1.0:
        raise ValueError(f"s_max must be in (0, 1), got {s_max}")

    def log_g(s):
        s = np.asarray(s, dtype=float)
        u = 1.0 - s
        return np.logaddexp(math.log(max(law.B, 1e-300)), math.log(law.C) + law.beta / u) + law.alpha * np.log(u)

    grid = np.linspace(0.0, s_max, 20001)
    i = int(np.argmin(log_g(grid)))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    if hi <= lo:
        return float(grid[i])
    res = minimize_scalar(lambda s: float(log_g(s)), bounds=(lo, hi), method="bounded",
                          options={"xatol": 1e-10})
    return float(res.x if log_g(res.x) <= log_g(grid[i]) else grid[i])


def optimal_sparsity_range(law: ScalingLaw, half_width: float = 0.005) -> tuple[float, float]:
    """Smallest and largest ``S*`` over every law whose constants round to ``law``'s (each constant
    in ``[c − half_width, c + half_width]``; 3 points per constant, 243 laws): how much the printed
    rounding leaves ``S*`` undetermined."""
    values = []
    for deltas in itertools.product((-half_width, 0.0, half_width), repeat=len(CONSTANTS)):
        consts = {k: max(getattr(law, k) + d, 1e-12) for k, d in zip(CONSTANTS, deltas)}
        values.append(optimal_sparsity(ScalingLaw(**consts)))
    return min(values), max(values)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss: ``r²/2`` for ``|r| ≤ δ``, ``δ(|r| − δ/2)`` beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _theta_to_law(theta: np.ndarray) -> ScalingLaw:
    e, b, c, la, lb = (float(v) for v in theta)
    return ScalingLaw(E=math.exp(e), B=math.exp(b), C=math.exp(c), alpha=math.exp(la), beta=math.exp(lb))


def _law_to_theta(law: ScalingLaw) -> np.ndarray:
    return np.log([law.E, max(law.B, 1e-300), law.C, law.alpha, law.beta])


def _objective(theta: np.ndarray, log_n: np.ndarray, u: np.ndarray, log_l: np.ndarray, delta: float):
    """``Σ huber(log L̂ − log L)/δ²`` and its gradient with respect to θ (analytic)."""
    e, b, c, la, lb = theta
    alpha, beta = math.exp(la), math.exp(lb)
    z_c = c + beta / u
    log_a = np.logaddexp(b, z_c)
    t = log_a - alpha * log_n
    pred = np.logaddexp(e, t)
    r = pred - log_l
    value = float(huber(r, delta).sum()) / delta**2
    dr = np.clip(r, -delta, delta) / delta**2  # huber'(r)/δ²
    w_e = np.exp(e - pred)
    w_t = 1.0 - w_e
    p_b = np.exp(b - log_a)
    p_c = np.exp(z_c - log_a)
    grad = np.array([
        (dr * w_e).sum(),
        (dr * w_t * p_b).sum(),
        (dr * w_t * p_c).sum(),
        (dr * w_t * (-alpha * log_n)).sum(),
        (dr * w_t * p_c * beta / u).sum(),
    ])
    return value, grad


def check_points(N: Sequence[float], S: Sequence[float], L: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Validate the observations; raise ``ValueError`` saying what is missing."""
    N, S, L = (np.asarray(v, dtype=float).ravel() for v in (N, S, L))
    if not (len(N) == len(S) == len(L)):
        raise ValueError(f"N, S and L must have the same length, got {len(N)}, {len(S)}, {len(L)}")
    if len(N) == 0:
        raise ValueError("no runs to fit: give at least 5 finished runs (model sizes × sparsities)")
    if not np.all(np.isfinite(N) & np.isfinite(S) & np.isfinite(L)):
        raise ValueError("N, S and L must be finite numbers")
    if np.any(N <= 0):
        raise ValueError(f"N (parameter counts) must be positive, got min {N.min()}")
    if np.any((S < 0) | (S >= 1)):
        raise ValueError(f"S (sparsity) must be in [0, 1), got range [{S.min()}, {S.max()}]")
    if np.any(L <= 0):
        raise ValueError(f"L (losses) must be positive, got min {L.min()}")
    n_s, n_n = len(np.unique(np.round(S, 6))), len(np.unique(N))
    if n_s < 2:
        raise ValueError(f"all runs have the same sparsity S={S[0]:.4g}: A(S) cannot be fitted; "
                         "train at least 2 (better ≥ 3) sparsity levels")
    if n_n < 2:
        raise ValueError(f"all runs have the same size N={N[0]:.4g}: α cannot be fitted; "
                         "train at least 2 (better ≥ 3) model sizes")
    if len(N) < len(CONSTANTS):
        raise ValueError(f"{len(N)} runs cannot determine {len(CONSTANTS)} constants; give at least 5")
    return N, S, L


def default_starts(N: np.ndarray, S: np.ndarray, L: np.ndarray) -> list[np.ndarray]:
    """Grid of starting θ: E below the smallest loss, α and β on log grids, B/C ratios; C is set so
    that the start roughly reproduces the median excess loss at the median size."""
    starts = []
    n_mid, excess_base = float(np.median(N)), float(np.median(L))
    for e_frac, alpha, beta, b_ratio in itertools.product(
        (0.2, 0.4, 0.6, 0.8, 0.9, 0.97), (0.03, 0.05, 0.1, 0.2, 0.3, 0.5), (0.01, 0.03, 0.1, 0.3), (1e-3, 0.1, 1.0)
    ):
        E = e_frac * float(L.min())
        excess = max(excess_base - E, 1e-3)
        C = excess * n_mid**alpha / (b_ratio + math.exp(beta / (1.0 - float(np.median(S)))))
        starts.append(np.log([E, b_ratio * C, C, alpha, beta]))
    return starts


@dataclass
class FitResult:
    law: ScalingLaw
    objective: float
    n_points: int
    n_starts: int
    optimal_sparsity: float
    n_refined: int = 0
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    bootstrap_samples: int = 0
    warnings: list[str] = field(default_factory=list)
    best_starts: list[list[float]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "constants": self.law.as_dict(),
            "optimal_sparsity": self.optimal_sparsity,
            "huber_objective": self.objective,
            "n_points": self.n_points,
            "n_starts": self.n_starts,
            "n_refined": self.n_refined,
            "bootstrap_samples": self.bootstrap_samples,
            "ci95": {k: list(v) for k, v in self.ci.items()},
            "warnings": self.warnings,
            "huber_delta": HUBER_DELTA,
            "form": "L(N,S) = E + (B + C*exp(beta/(1-S))) / N^alpha",
        }


def _one_blas_thread():
    """L-BFGS-B's 5×5 BLAS calls only pay thread wake-ups (30× slower on a busy 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: the fit is right without it, only slower
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def theta_bounds(log_l: np.ndarray) -> list[tuple[float, float]]:
    """Box for L-BFGS-B in θ-space: wide enough for any sensible law, narrow enough that no
    ``exp`` overflows (E ≤ max L, B and C in [1e-13, 1e13], α in [1e-4, 3], β in [1e-5, 20])."""
    return [(math.log(1e-4), float(log_l.max())), (-30.0, 30.0), (-30.0, 30.0),
            (math.log(1e-4), math.log(3.0)), (math.log(1e-5), math.log(20.0))]


def _minimize(starts: Sequence[np.ndarray], log_n, u, log_l, delta) -> list[tuple[float, np.ndarray]]:
    from scipy.optimize import minimize

    bounds = theta_bounds(log_l)
    lo, hi = np.array(bounds).T
    out = []
    with _one_blas_thread():
        for th0 in starts:
            x0 = np.clip(th0, lo, hi)
            res = minimize(_objective, x0, args=(log_n, u, log_l, delta), jac=True, method="L-BFGS-B",
                           bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
            if np.all(np.isfinite(res.x)) and math.isfinite(res.fun):
                out.append((float(res.fun), res.x))
    out.sort(key=lambda p: p[0])
    return out


def fit_scaling_law(
    N: Sequence[float],
    S: Sequence[float],
    L: Sequence[float],
    *,
    delta: float = HUBER_DELTA,
    starts: Sequence[np.ndarray] | None = None,
    refine: int = 8,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> FitResult:
    """Fit the five constants to runs ``(N_i, S_i, L_i)``.

    Every start of the grid (:func:`default_starts`, 432 points) is scored by the objective, L-BFGS
    runs from the ``refine`` best, the lowest optimum wins.  ``bootstrap > 0`` adds percentile CIs
    from that many resamples of the runs, each refitted by L-BFGS from the full fit's optimum.
    """
    N, S, L = check_points(N, S, L)
    log_n, u, log_l = np.log(N), 1.0 - S, np.log(L)
    starts = list(starts) if starts is not None else default_starts(N, S, L)
    if len(starts) > refine:  # screen the grid by objective value, run L-BFGS from the best ones
        values = [_objective(th, log_n, u, log_l, delta)[0] for th in starts]
        order = np.argsort(np.nan_to_num(values, nan=np.inf))
        candidates = [starts[i] for i in order[:refine]]
    else:
        candidates = starts
    ranked = _minimize(candidates, log_n, u, log_l, delta)
    if not ranked:
        raise RuntimeError("the scaling-law fit failed from every starting point")
    best_val, best_theta = ranked[0]
    law = _theta_to_law(best_theta)
    warnings = []
    n_levels = len(np.unique(np.round(S, 6)))
    if n_levels < 3:
        warnings.append(f"only {n_levels} sparsity levels: B, C and β are not separately identifiable")
    if len(np.unique(N)) < 3:
        warnings.append("fewer than 3 model sizes: E and α are poorly determined")
    result = FitResult(law=law, objective=best_val, n_points=len(N), n_starts=len(starts),
                       n_refined=len(candidates), optimal_sparsity=optimal_sparsity(law), warnings=warnings,
                       best_starts=[th.tolist() for _, th in ranked[:3]])
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        refit_from = [best_theta]
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(N), len(N))
            if len(np.unique(S[idx])) < 2 or len(np.unique(N[idx])) < 2:
                continue
            fits = _minimize(refit_from, log_n[idx], u[idx], log_l[idx], delta)
            if fits:
                b_law = _theta_to_law(fits[0][1])
                samples.append([*(getattr(b_law, k) for k in CONSTANTS), optimal_sparsity(b_law)])
        if samples:
            arr = np.array(samples)
            q = (1 - confidence) / 2 * 100
            for j, name in enumerate((*CONSTANTS, "optimal_sparsity")):
                lo, hi = np.percentile(arr[:, j], [q, 100 - q])
                result.ci[name] = (float(lo), float(hi))
        result.bootstrap_samples = len(samples)
    return result
