"""Session-wide test settings, applied before any test module (and so before triton) is imported.

``TRITON_INTERPRET=1`` makes Triton kernels run in its numpy interpreter on the CPU.  Triton reads it
when a kernel is decorated (at import), so it is set here, once, rather than by a test module — the
result no longer depends on collection order.  ``tests/run.sh`` exports the same value; to run the
kernel tests natively on a GPU, set ``TRITON_INTERPRET=0`` yourself.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(ROOT))


@pytest.fixture
def torch_ops(monkeypatch):
    """Reference: the torch path of the ops (no kernel dispatch, even on CUDA)."""
    monkeypatch.setenv("QSPARSE_TRITON", "0")
