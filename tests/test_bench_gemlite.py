"""``tools/bench_gemlite.py`` where it cannot measure (CPU CI, gemlite optional): ``--help`` works, a run
refuses with exit 2 and one line, and the package itself never imports gemlite."""

import re

import pytest
import torch

from tests.tools_loader import ROOT, load_tool


def _tool():
    return load_tool("bench_gemlite")


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
