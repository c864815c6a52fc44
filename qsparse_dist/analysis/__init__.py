"""Scaling-law fitting and sparsity analysis of finished runs (issue 9)."""

from .runs import RunPoint, count_params, load_runs, overall_sparsity, projection_params
from .scaling_law import (
    HUBER_DELTA,
    PAPER_FULL_PRECISION,
    FitResult,
    ScalingLaw,
    fit_scaling_law,
    optimal_sparsity,
)

__all__ = [
    "HUBER_DELTA",
    "PAPER_FULL_PRECISION",
    "FitResult",
    "RunPoint",
    "ScalingLaw",
    "count_params",
    "fit_scaling_law",
    "load_runs",
    "optimal_sparsity",
    "overall_sparsity",
    "projection_params",
]
