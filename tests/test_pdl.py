"""Programmatic Dependent Launch switches (qsparse_dist/kernels/pdl.py) and the safety rule of the
decode kernels: every kernel that can be launched with PDL waits for its predecessor before any
memory access, and every launch that asks for PDL targets such a kernel."""

import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from qsparse_dist.kernels import pdl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "qsparse_dist" / "kernels"
DECODE_KERNEL_FILES = ("decoder.py", "gemv.py", "ternary_dp4a.py", "hist_gemv.py")
#: the kernels of a KernelDecoder step: each must take the PDL constexpr
DECODE_KERNELS = {"_prologue_kernel", "_rope_cache_kernel", "_decode_attention_kernel", "_sparse_gemv_kernel",
                  "_ternary_gemv_kernel", "_ternary_gemv_w32_kernel", "_gather_gemv_kernel", "_ternary_k4_kernel",
                  "_ternary_k16_kernel", "_hist_sparse_gemv_kernel", "_hist_k4_kernel", "_hist_k16_kernel"}


def test_env_setting_parses_and_refuses():
    assert pdl.env_setting("") is None and pdl.env_setting("  ") is None
    assert [pdl.env_setting(v) for v in ("0", "off", "1", "ON", "2", "trigger")] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="QSPARSE_PDL"):
        pdl.env_setting("yes please")


@pytest.mark.parametrize("env", ["", "0", "1", "2"])
def test_off_on_cpu_and_under_the_interpreter(env, monkeypatch):
    monkeypatch.setenv("QSPARSE_PDL", env)
    monkeypatch.setattr(pdl, "ENABLED", True)  # even forced on: refused where unsupported
    assert not pdl.pdl_supported("cpu") and not pdl.enabled(torch.device("cpu"))
    assert pdl.launch_kwargs("cpu") == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl.pdl_supported("cuda:0") and pdl.launch_kwargs("cuda") == {}


def test_env_override_switches_off_and_trigger(monkeypatch):
    if not pdl.pdl_supported("cuda"):
        pytest.skip("needs a CUDA device of capability >= 9 and a Triton with launch_pdl")
    monkeypatch.setattr(pdl, "ENABLED", None)
    monkeypatch.setenv("QSPARSE_PDL", "0")
    assert pdl.launch_kwargs("cuda") == {}
    monkeypatch.setenv("QSPARSE_PDL", "1")
    assert pdl.launch_kwargs("cuda") == {"PDL": 1, "launch_pdl": True}
    monkeypatch.setenv("QSPARSE_PDL", "2")
    assert pdl.launch_kwargs("cuda") == {"PDL": 2, "launch_pdl": True}
    monkeypatch.delenv("QSPARSE_PDL")
    assert pdl.launch_kwargs("cuda") == {"PDL": 2, "launch_pdl": True}


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
                ast.unparse(d) in ("triton.jit", "jit") for d in node.decorator_list):
            yield node


def _first_statement(fn: ast.FunctionDef) -> ast.stmt:
    body = fn.body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # docstring
        body = body[1:]
    return body[0]


@pytest.mark.parametrize("fname", DECODE_KERNEL_FILES)
def test_every_pdl_kernel_waits_first_and_every_pdl_launch_targets_one(fname):
    tree = ast.parse((ROOT / fname).read_text())
    pdl_kernels = set()
    for fn in _jit_functions(tree):
        if "PDL" not in [a.arg for a in fn.args.args]:
            continue
        pdl_kernels.add(fn.name)
        assert ast.unparse(_first_statement(fn)) == "grid_dependency_wait(PDL)", (
            f"{fname}:{fn.name}: the first statement must be grid_dependency_wait(PDL) (no load/store before it)")
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Subscript):
            continue  # kernel[grid](...) launches only
        if any(k.arg is None and "launch_kwargs" in ast.unparse(k.value) for k in call.keywords):
            target = ast.unparse(call.func.value)
            assert target in pdl_kernels or target == "kernel", f"{fname}: {target} launched with PDL lacks the wait"
    assert DECODE_KERNELS & {f.name for f in _jit_functions(tree)} <= pdl_kernels


def test_shared_launchers_only_get_pdl_kernels():
    """``_launch_ternary`` / ``_launch_hist_ternary`` launch the kernel they are handed: all callers pass
    PDL kernels."""
    from qsparse_dist.kernels import hist_gemv, ternary_dp4a

    for mod in (ternary_dp4a, hist_gemv):
        src = textwrap.dedent(inspect.getsource(mod))
        for name in ("_ternary_k4_kernel", "_ternary_k16_kernel", "_hist_k4_kernel", "_hist_k16_kernel"):
            if f"def {name}(" in src:
                assert "PDL" in getattr(mod, name).arg_names, name


def test_grid_dependency_wait_is_a_noop_in_the_interpreter(monkeypatch):
    """A PDL kernel launched without PDL (CPU, interpreter) computes the same result."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device")
    from qsparse_dist.kernels.gemv import sparse_gemv

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, generator=g).to(dev)
    x[0, ::3] = 0
    wt = torch.randn(64, 32, generator=g).to(dev)
    torch.testing.assert_close(sparse_gemv(x, wt), x @ wt, rtol=1e-5, atol=1e-5)
