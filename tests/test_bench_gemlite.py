"""``tools/bench_gemlite.py`` where it cannot measure (CPU CI, gemlite optional): ``--help`` works, a run
refuses with exit 2 and one line, and the package itself never imports gemlite."""

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("bench_gemlite_tool", ROOT / "tools" / "bench_gemlite.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_help_without_gemlite(capsys):
    with pytest.raises(SystemExit) as exc:
        _tool().main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--gemlite-autotune" in out and "--json" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal checked here is the no-GPU one")
def test_refuses_without_gpu_in_one_line(capsys):
    assert _tool().main(["--presets", "1b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_gemlite:")


def test_package_never_imports_gemlite():
    pattern = re.compile(r"^\s*(import|from)\s+gemlite\b", re.M)
    hits = [str(p.relative_to(ROOT)) for p in (ROOT / "qsparse_dist").rglob("*.py") if pattern.search(p.read_text())]
    assert hits == []
