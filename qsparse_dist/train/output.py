"""Console output of a training job: one line per event, from rank 0, unless asked for more.

``logging.level`` (``--verbose`` = ``info``) decides what reaches the console:

* ``warning`` (default) — rank 0 prints the run's own lines (start, steps, checkpoints, errors) and
  the library warnings that are news; library notices known to be harmless here are hidden:
  megatron's import-time "Transformer Engine and Apex are not installed" / "Apex is not installed"
  fallbacks, its "full scope is deprecated" (``cuda_graph_scope``) and per-layer "Unknown MLP type …
  Using default kwargs." (our ``QSparseMLP`` subclasses megatron's ``MLP``; the default kwargs are
  right), and DeepSpeed's "Setting accelerator to CPU".  Ranks ≠ 0 print only errors.
* ``info`` — everything from every rank, with DeepSpeed's logger at INFO; ``debug`` — DEBUG too.

It must run before megatron-core or DeepSpeed are imported (their notices come at import time).
The ``deepspeed`` launcher's own INFO lines come from the launcher process, before any rank starts:
``deepspeed --log_level warning …`` hides them (``launch/train_deepspeed.sh`` passes it unless
``DS_LOG_LEVEL`` says otherwise; ``launch/quickstart.sh`` passes it).
"""

from __future__ import annotations

import logging
import os
import warnings

__all__ = ["rank_from_env", "configure_output", "HIDDEN_NOTICES"]

HIDDEN_NOTICES = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
)
"""Regexes of library ``warnings.warn`` messages hidden at the default level."""

_DS_HIDDEN = ("Setting accelerator to CPU",)


def rank_from_env() -> int:
    """The global rank the launcher gave this process (0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _DeepSpeedFilter(logging.Filter):
    """On DeepSpeed's logger (survives the logger's re-creation at ``import deepspeed``)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if self.rank != 0:
            return record.levelno >= logging.ERROR
        return not any(s in str(record.msg) for s in _DS_HIDDEN)


_installed: list[tuple[logging.Logger, logging.Filter]] = []


def configure_output(level: str = "warning", rank: int | None = None) -> None:
    """Apply ``logging.level`` for this process (see the module docstring); idempotent."""
    rank = rank_from_env() if rank is None else rank
    for log, f in _installed:
        log.removeFilter(f)
    _installed.clear()
    from ..compat.megatron import quiet_unknown_mlp_warning

    verbose = level in ("info", "debug")
    quiet_unknown_mlp_warning(not verbose)
    ds_log = logging.getLogger("DeepSpeed")
    if verbose:
        import deepspeed  # noqa: F401  (creates its logger; its level is set here, after that)
        from deepspeed.utils.logging import set_log_level_from_string

        set_log_level_from_string(level, ds_log)
        return
    f = _DeepSpeedFilter(rank)
    ds_log.addFilter(f)
    _installed.append((ds_log, f))
    if rank != 0:
        warnings.filterwarnings("ignore")
        mlog = logging.getLogger("megatron")
        mlog.setLevel(logging.ERROR)
        return
    for pattern in HIDDEN_NOTICES:
        warnings.filterwarnings("ignore", message=pattern)
