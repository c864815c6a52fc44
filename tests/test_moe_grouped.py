"""Grouped-GEMM MoE experts and the sync-free local dispatcher against megatron's per-expert path.

The independent truth is the existing path: megatron's ``MoELayer`` with its ``MoEAlltoAllTokenDispatcher``
and our :class:`QSparseSequentialMLP` (one ``QSparseMLP`` per expert, host splits).  The new path is
:class:`QSparseMoELayer` (local dispatcher) with :class:`QSparseGroupedMLP` (one grouped GEMM per
projection).  Same weights (the state dicts have the same keys and load strictly into each other);
on the CPU in float32 the two must agree bit for bit — logits and every gradient — for dense, Q-Sparse
and BitNet + Q-Sparse experts, through ``torch._grouped_mm`` and through the per-expert loop fallback.

One in-process gloo group of size 1 (no torchrun).  The CUDA tests (skipped here) check bf16 agreement
on the GPU and that a forward + backward of an MoE layer makes no host synchronisation; run them with
``TRITON_INTERPRET=0`` (tests/conftest.py defaults it to 1, and the interpreter copies every kernel
argument to the host — itself a sync — and cannot run liger's RMSNorm).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from qsparse_dist.config import config_from_dict
from tests.dist_utils import free_port

VOCAB, SEQ, BATCH = 64, 16, 3
KINDS = ("dense", "qsparse", "bitnet_qsparse")


def _cfg(linear: str, grouped: bool, activation: str = "relu2glu", dtype: str = "fp32"):
    model = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
             "num_query_groups": 2, "ffn_hidden_size": 48, "seq_length": SEQ, "ffn_activation": activation,
             "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 24, "grouped_gemm": grouped}}
    sparsity = {"linear": linear, "qkv": 0.5, "out": 0.5, "up": 0.25, "down": 0.5}
    return config_from_dict({"model": model, "sparsity": sparsity, "train": {"dtype": dtype}})


@pytest.fixture(scope="module")
def process_group():
    """A gloo group of one process (megatron's parallel state needs torch.distributed)."""
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", world_size=1, rank=0)
    yield
    if owned:
        dist.destroy_process_group()


def _pair(linear: str, activation: str = "relu2glu", dtype: str = "fp32"):
    """(grouped model, sequential model) with the same weights, both on this rank."""
    from qsparse_dist.model.megatron.gpt import build_megatron_gpt
    from qsparse_dist.parallel import initialize_parallel

    initialize_parallel(_cfg(linear, True).parallel, seed=0)
    grouped = build_megatron_gpt(_cfg(linear, True, activation, dtype))
    sequential = build_megatron_gpt(_cfg(linear, False, activation, dtype))
    keys = lambda m: {k for k in m.state_dict() if not k.endswith("_extra_state")}  # noqa: E731
    assert keys(grouped) == keys(sequential)  # checkpoint layout unchanged
    sequential.load_state_dict(grouped.state_dict(), strict=True)
    return grouped, sequential


def _run(model, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    pos = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    logits = model(tokens, pos, None)
    (logits.float().square().mean() + 0.1 * logits.float().mean()).backward()
    return logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                                     if p.grad is not None}


def _compare(a, b) -> tuple[float, float]:
    (la, ga), (lb, gb) = a, b
    assert set(ga) == set(gb) and any(".mlp.experts." in n for n in ga)
    return (la - lb).abs().max().item(), max((ga[n] - gb[n]).abs().max().item() for n in ga)


@pytest.mark.parametrize("linear", KINDS)
@pytest.mark.parametrize("grouped_mm", ["torch", "loop"])
def test_grouped_experts_equal_sequential(process_group, monkeypatch, linear, grouped_mm):
    from qsparse_dist.model.megatron.experts import QSparseGroupedMLP, QSparseMoELayer, grouped_mm_usable
    from qsparse_dist.parallel import destroy_parallel

    if grouped_mm == "loop":
        monkeypatch.setenv("QSPARSE_GROUPED_MM", "0")
    elif not grouped_mm_usable(torch.ones(2, 8), torch.ones(2, 8, 8)):
        pytest.skip("this torch has no CPU torch._grouped_mm")
    grouped, sequential = _pair(linear)
    try:
        layer = grouped.decoder.layers[0].mlp
        assert isinstance(layer, QSparseMoELayer) and isinstance(layer.experts, QSparseGroupedMLP)
        assert type(layer.token_dispatcher).__name__ == "LocalTokenDispatcher"
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
        d_logits, d_grads = _compare(_run(grouped, tokens), _run(sequential, tokens))
        assert d_logits == 0.0 and d_grads == 0.0, (d_logits, d_grads)
    finally:
        destroy_parallel()


def test_grouped_experts_uneven_and_empty_experts(process_group):
    """Experts module alone, BitNet + Q-Sparse with dReLU: counts (5, 0, 9, 2) — one expert gets no
    token — forward and gradients equal the per-expert loop, sparsity counters per expert too."""
    from qsparse_dist.model.megatron.gpt import set_track_sparsity
    from qsparse_dist.parallel import destroy_parallel

    grouped, sequential = _pair("bitnet_qsparse", activation="drelu")
    try:
        eg, es = grouped.decoder.layers[0].mlp.experts, sequential.decoder.layers[0].mlp.experts
        set_track_sparsity(grouped, True)
        set_track_sparsity(sequential, True)
        counts = torch.tensor([5, 0, 9, 2])
        g = torch.Generator().manual_seed(2)
        x = torch.randn(16, 32, generator=g)
        probs = torch.rand(16, generator=g)
        outs = []
        for experts in (eg, es):
            xi = x.clone().requires_grad_(True)
            out, bias = experts(xi, counts, probs)
            assert bias is None
            out.square().sum().backward()
            outs.append((out.detach(), xi.grad, [p.grad.clone() for p in experts.parameters()],
                         [m.sparsity_counts() for e in experts.local_experts for m in (e.linear_fc1, e.linear_fc2)]))
        (o1, gx1, gp1, s1), (o2, gx2, gp2, s2) = outs
        assert torch.equal(o1, o2) and torch.equal(gx1, gx2)
        assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))
        assert [(float(z), n) for z, n in s1] == [(float(z), n) for z, n in s2]
        assert s1[2][1] == 0  # expert 1 saw no token
    finally:
        destroy_parallel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grouped_close_to_sequential_bf16(process_group):
    from qsparse_dist.parallel import destroy_parallel

    grouped, sequential = _pair("qsparse", dtype="bf16")
    try:
        grouped.cuda(), sequential.cuda()
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
        d_logits, d_grads = _compare(_run(grouped, tokens), _run(sequential, tokens))
        print(f"bf16 grouped vs sequential: logits {d_logits:.3g}, grads {d_grads:.3g}")
        assert d_logits < 0.1 and d_grads < 0.1, (d_logits, d_grads)
    finally:
        destroy_parallel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_moe_layer_makes_no_host_sync(process_group):
    """``torch.cuda.set_sync_debug_mode`` flags every synchronising call (``.item()``, ``.cpu()``,
    ``masked_select``, ``nonzero``...) in one MoE layer's forward ("warn": the stack of each is
    collected) and forward + backward ("error")."""
    import traceback
    import warnings

    from qsparse_dist.parallel import destroy_parallel

    grouped, _ = _pair("qsparse", dtype="bf16")
    try:
        layer = grouped.decoder.layers[0].mlp.cuda()
        x = torch.randn(SEQ * 64, BATCH, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        layer(x)[0].float().sum().backward()  # warm-up (lazy init, kernel autotuning)
        torch.cuda.synchronize()
        syncs: list[str] = []
        torch.cuda.set_sync_debug_mode("warn")  # (switching it on warns by itself: capture after)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = lambda msg, *a, **k: syncs.append(
                    f"{msg}\n" + "".join(traceback.format_stack()[-9:-2]))
                layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not syncs, f"{len(syncs)} host syncs in the forward; first:\n" + "\n".join(syncs[:2])
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = layer(x)
            out.float().square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        destroy_parallel()
