"""The runtime's kernel backend (``infer.backends.kernels.make_linear``) decodes exactly like the torch backend.

Runs the Triton GEMVs on the CPU under ``TRITON_INTERPRET=1`` with ``QSPARSE_TRITON=1`` (the switch
that lets the dispatch take CPU tensors); on a GPU the same path runs natively.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on the CPU (tests/run.sh sets it)", allow_module_level=True)

from qsparse_dist.export import export_hf, load_checkpoint  # noqa: E402
from qsparse_dist.infer.backends.kernels import KernelLinear  # noqa: E402
from qsparse_dist.infer.generate import generate_ids  # noqa: E402
from qsparse_dist.infer.runtime import load_model  # noqa: E402
from tests.export_fixtures import make_checkpoint, make_config  # noqa: E402

CASES = {  # name: (sparsity kind, pack ternary)
    "qsparse": ("qsparse", False),
    "block_qsparse": ("block_qsparse", False),
    "bitnet_qsparse": ("bitnet_qsparse", False),
    "bitnet_qsparse_packed": ("bitnet_qsparse", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_backend_decodes_like_torch(name, tmp_path, monkeypatch):
    monkeypatch.setenv("QSPARSE_TRITON", "1")
    kind, pack = CASES[name]
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ck", make_config(kind, layers=1), None, scale=3.0))
    out = export_hf(ckpt, tmp_path / "hf", pack_ternary=pack).out_dir
    ref = load_model(out, device="cpu", backend="torch", load_tokenizer=False)
    ker = load_model(out, device="cpu", backend="kernels", load_tokenizer=False)
    assert sum(isinstance(m, KernelLinear) for m in ker.model.modules()) == 4  # qkv, out, fc1, fc2
    prompt = [5, 17, 42, 7, 99]
    with torch.no_grad():
        want = list(generate_ids(ref.model, prompt, max_new_tokens=4, temperature=0.0))
        got = list(generate_ids(ker.model, prompt, max_new_tokens=4, temperature=0.0))
        tok = torch.tensor([prompt])
        _, cache_r = ref.model(tok, kv_caches=[])
        _, cache_k = ker.model(tok, kv_caches=[])
        step = torch.tensor([[3]])
        lr, _ = ref.model(step, kv_caches=cache_r, start_pos=len(prompt))
        lk, _ = ker.model(step, kv_caches=cache_k, start_pos=len(prompt))
    assert got == want
    assert (lk - lr).abs().max().item() <= 1e-4
