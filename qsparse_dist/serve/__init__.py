"""``qsparse-dist serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for exported models.

Modules: :mod:`.app` (routes), :mod:`.schemas` (request bodies, error bodies), :mod:`.scheduler`
(the background decode worker: queue, continuous batching up to ``--max-batch``), :mod:`.batch_step`
(one decode step over several requests with per-request KV caches), :mod:`.text` (detokenization and
stop strings), :mod:`.metrics` (Prometheus text).  User documentation: ``docs/serving.md``.
Needs the ``serve`` extra (``pip install 'qsparse-dist[serve]'``).
"""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
