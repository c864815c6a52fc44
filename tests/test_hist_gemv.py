"""Top-K selected inside the GEMV from the prologue's key histogram (``qsparse_dist.kernels.hist_gemv``),
against the torch ops, under the interpreter (TRITON_INTERPRET=1) on CPU; unchanged on a GPU.

Truths: ``torch.bincount`` of the keys, ``ops.topk_sparsify`` / ``ops.topk_mask`` (ties to the lowest
index), an int64 matmul for the ternary product.  Rows with planted ties straddling the threshold, widths
that are not powers of two, split-K so that the tie rank crosses program boundaries.
"""

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("needs TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

from qsparse_dist.kernels.decoder import prologue  # noqa: E402
from qsparse_dist.kernels.gemv import GemvConfig  # noqa: E402
from qsparse_dist.kernels.hist_gemv import (  # noqa: E402
    HIST_SIZE,
    hist_sparse_gemv,
    hist_ternary_k4,
    hist_threshold_torch,
)
from qsparse_dist.kernels.ternary_dp4a import pack_k4  # noqa: E402
from qsparse_dist.ops import kept_count, pack_ternary, topk_mask, topk_sparsify  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _row(d: int, dtype, seed: int, ties: str = "straddle") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, d, generator=g)
    if ties == "straddle":  # one magnitude on ~40 % of the row, both signs: the threshold cuts the ties
        x[0, ::3] = 0.75
        x[0, 1::5] = -0.75
    elif ties == "all":
        x[:] = 0.5
    return x.to(dtype).to(DEV)


def _keys(y: torch.Tensor) -> torch.Tensor:
    return (y.view(torch.int16).to(torch.int32) & 0x7FFF).reshape(-1).cpu()


def _hist_of(y: torch.Tensor) -> torch.Tensor:
    """The histogram a prologue with ``hist_out`` writes for row ``y``."""
    hist = torch.zeros(HIST_SIZE, dtype=torch.int32, device=DEV)
    prologue(y, torch.empty_like(y), d=y.shape[1], hist_out=hist)
    return hist


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [37, 1000])
def test_prologue_histogram_is_bincount_of_keys(dtype, d, torch_ops):
    """Fine bins = bincount of the 15-bit keys, coarse bins = bincount of key >> 7; the row is written
    whole (no selection), int8 codes of the whole row with ``q_out``."""
    from qsparse_dist.ops import quantize_activation_int8

    x = _row(d, dtype, seed=d)
    hist = torch.zeros(HIST_SIZE, dtype=torch.int32, device=DEV)
    y = torch.empty_like(x)
    q = torch.empty(1, d, dtype=torch.int8, device=DEV)
    s = torch.empty(1, device=DEV)
    prologue(x, y, d=d, q_out=(q, s), hist_out=hist)
    keys = _keys(x)
    assert torch.equal(hist[:32768].cpu(), torch.bincount(keys, minlength=32768).int())
    assert torch.equal(hist[32768:].cpu(), torch.bincount(keys >> 7, minlength=256).int())
    assert torch.equal(y, x)
    q_ref, s_ref = quantize_activation_int8(x.float())
    assert torch.equal(q, q_ref) and torch.allclose(s, s_ref.reshape(-1))


@pytest.mark.parametrize("ties", ["straddle", "none", "all"])
@pytest.mark.parametrize("d,sparsity", [(300, 0.5), (1000, 0.7), (96, 0.05)])
def test_threshold_from_histogram(ties, d, sparsity, torch_ops):
    """The torch reading of the histogram reproduces topk_mask's threshold and tie count."""
    x = _row(d, torch.bfloat16, seed=7, ties=ties)
    k = kept_count(d, sparsity)
    t, need, n_eq = hist_threshold_torch(_hist_of(x), k)
    keys = _keys(x)
    assert int((keys > t).sum()) + need == k and 1 <= need <= n_eq == int((keys == t).sum())


CFGS = [None, GemvConfig(block_n=32, block_k=16, split_k=7), GemvConfig(block_n=64, block_k=64, split_k=1)]


@pytest.mark.parametrize("cfg", CFGS, ids=["default", "splitk7", "one-split"])
@pytest.mark.parametrize("ties", ["straddle", "none", "all"])
@pytest.mark.parametrize("d,sparsity", [(300, 0.5), (1000, 0.7)])
def test_hist_sparse_gemv_selects_exactly(cfg, ties, d, sparsity, torch_ops):
    """With W = I the GEMV returns its masked input: equal to topk_sparsify(y) bit for bit, ties included,
    whichever program a tie falls in; the other histogram buffer comes back zeroed."""
    y = _row(d, torch.bfloat16, seed=d + len(ties), ties=ties)
    k = kept_count(d, sparsity)
    hist = _hist_of(y)
    other = torch.full((HIST_SIZE,), 5, dtype=torch.int32, device=DEV)
    eye = torch.eye(d, dtype=torch.bfloat16, device=DEV)
    got = hist_sparse_gemv(y, hist, k, eye, config=cfg, zero_hist=other)
    assert torch.equal(got, topk_sparsify(y, sparsity).float())
    assert not other.any()


def test_hist_sparse_gemv_random_weights(torch_ops):
    """Random weights, 8B-like aspect (K > N, split-K): the float32 product of the top-K input."""
    d, n = 700, 48
    g = torch.Generator().manual_seed(1)
    y = _row(d, torch.bfloat16, seed=2)
    wt = torch.randn(d, n, generator=g).to(torch.bfloat16).to(DEV)
    got = hist_sparse_gemv(y, _hist_of(y), kept_count(d, 0.5), wt, config=GemvConfig(block_n=16, block_k=32, split_k=4))
    ref = topk_sparsify(y, 0.5).double() @ wt.double()
    assert (got.double() - ref).norm() / ref.norm() < 1e-6


@pytest.mark.parametrize("cfg", [None, GemvConfig(block_n=16, block_k=4, split_k=3)], ids=["default", "splitk"])
@pytest.mark.parametrize("ties", ["straddle", "all"])
def test_hist_ternary_k4_equals_int64_reference(cfg, ties, torch_ops):
    """dp4a ternary GEMV with the selection inside: the int8 codes of the whole row masked by
    topk_mask(y), times the ternary codes, exact in int64."""
    d, n = 120, 40
    g = torch.Generator().manual_seed(5)
    y = _row(d, torch.bfloat16, seed=3, ties=ties)
    q = torch.randint(-128, 128, (1, d), generator=g).to(torch.int8).to(DEV)
    w_q = torch.randint(-1, 2, (n, d), generator=g).to(torch.int8)
    k = kept_count(d, 0.5)
    p4, hist, one = pack_k4(pack_ternary(w_q)).to(DEV), _hist_of(y), torch.ones(1, device=DEV)
    qm = torch.where(topk_mask(y, 0.5), q, torch.zeros_like(q)).long().cpu()
    ref = qm @ w_q.long().t()
    assert torch.equal(hist_ternary_k4(y, q, one, hist, k, p4, one[0], config=cfg).cpu(), ref.float())
    got = hist_ternary_k4(y, q, torch.tensor([0.25], device=DEV), hist, k, p4, torch.tensor(0.37, device=DEV),
                          config=cfg)
    ref_scaled = ref.double() * (0.25 * 0.37)
    assert (got.double().cpu() - ref_scaled).norm() / ref_scaled.norm() < 1e-6  # split-K: scaled partial sums


def test_hist_refuses_bad_inputs():
    y = torch.zeros(1, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bf16/fp16 row"):
        hist_sparse_gemv(y.float(), torch.zeros(HIST_SIZE, dtype=torch.int32), 4, torch.zeros(8, 4))
    with pytest.raises(ValueError, match="hist must be int32"):
        hist_sparse_gemv(y, torch.zeros(16, dtype=torch.int32), 4, torch.zeros(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="k must be in"):
        hist_sparse_gemv(y, torch.zeros(HIST_SIZE, dtype=torch.int32), 9, torch.zeros(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="hist_out needs"):
        prologue(y, y.clone(), d=8, k=4, hist_out=torch.zeros(HIST_SIZE, dtype=torch.int32))


@pytest.mark.parametrize("kind", ["qsparse", "bitnet_qsparse"])
def test_kernel_decoder_hist_matches_exact_select_decoder(kind, torch_ops):
    """bf16 decode step with the selection inside the GEMVs vs the same step with the radix-select
    prologue and predicated GEMVs (the same exact top-K): the kept features agree, so the logits
    agree to float32 summation order."""
    from qsparse_dist.config.schema import ModelConfig, SparsityConfig
    from qsparse_dist.infer.backends.decoder import KernelDecoder
    from qsparse_dist.model.reference import QSparseGPT

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=48, seq_length=8)
    model = QSparseGPT(m, SparsityConfig(linear=kind, qkv=0.5, out=0.5, up=0.5, down=0.6)).to(DEV)
    model = model.to(torch.bfloat16).eval()
    toks = [3, 17, 5]
    outs = []
    with torch.no_grad():
        for opts in ({"hist": True, "ternary": "k4"}, {"hist": True, "ternary": "k16"},
                     {"select": "radix", "gather": False, "ternary": "k4"}):
            dec = KernelDecoder(model, max_len=8, **opts)
            assert all(lay["fc2"].hist for lay in dec.layers) == ("hist" in opts)
            assert kind == "qsparse" or dec.layers[0]["fc2"].mode == f"ternary_{opts['ternary']}"
            outs.append(torch.cat([dec.step(torch.tensor([t], device=DEV), torch.tensor([p], device=DEV)).clone()
                                   for p, t in enumerate(toks)]))
            assert not dec.hist[dec._hist_cur].any()  # the next prologue's buffer was zeroed by the last GEMV
    *hist_runs, ref = outs
    for a in hist_runs:
        assert (a - ref).norm() / ref.norm() < 1e-5


@pytest.mark.parametrize("cfg", [None, GemvConfig(block_n=16, block_k=2, split_k=3)], ids=["default", "splitk"])
@pytest.mark.parametrize("skip", [True, False])
def test_ternary_k16_equals_int64_reference(cfg, skip, torch_ops):
    """16 codes per pre-permuted int32 word (``pack_k16``): exact integer product, extreme codes,
    zero activation groups skipped or not."""
    from qsparse_dist.kernels.ternary_dp4a import pack_k16, ternary_gemv_k16

    d, n = 96, 40
    g = torch.Generator().manual_seed(9)
    w_q = torch.randint(-1, 2, (n, d), generator=g).to(torch.int8)
    w_q[0] = 1  # word with every top bit set (negative int32)
    q = torch.randint(-128, 128, (1, d), generator=g).to(torch.int8)
    q[0, :2] = torch.tensor([127, -128])
    q[0, 32:48] = 0  # a whole group of zeros
    one = torch.ones(1, device=DEV)
    got = ternary_gemv_k16(q.to(DEV), one, pack_k16(pack_ternary(w_q), d).to(DEV), one[0], skip_zeros=skip,
                           config=cfg)
    assert torch.equal(got.cpu(), (q.long() @ w_q.long().t()).float())


@pytest.mark.parametrize("ties", ["straddle", "all"])
def test_hist_ternary_k16_equals_int64_reference(ties, torch_ops):
    from qsparse_dist.kernels.hist_gemv import hist_ternary_k16
    from qsparse_dist.kernels.ternary_dp4a import pack_k16

    d, n = 160, 24
    g = torch.Generator().manual_seed(4)
    y = _row(d, torch.bfloat16, seed=8, ties=ties)
    q = torch.randint(-128, 128, (1, d), generator=g).to(torch.int8).to(DEV)
    w_q = torch.randint(-1, 2, (n, d), generator=g).to(torch.int8)
    k = kept_count(d, 0.6)
    one = torch.ones(1, device=DEV)
    got = hist_ternary_k16(y, q, one, _hist_of(y), k, pack_k16(pack_ternary(w_q), d).to(DEV), one[0],
                           config=GemvConfig(block_n=8, block_k=2, split_k=4))
    qm = torch.where(topk_mask(y, 0.6), q, torch.zeros_like(q)).long().cpu()
    assert torch.equal(got.cpu(), (qm @ w_q.long().t()).float())


def test_deep_bitnet_qsparse_decoder_fp32_parity(torch_ops):
    """Issue 16's fp32 bug (bitnet_qsparse 0.57-0.78 relative at the 8B shape): BitNet GEMV outputs are
    integer sums times one scale, so the next top-K sees exact ties, and any last-bit difference from
    the reference decides them differently; the flips compound with depth.  The last cause was the
    split-K ternary kernels scaling each partial sum before the atomic add (order- and split-dependent
    rounding; now: unscaled exact partials, the last program scales once, ``_store_int_sum``).  This
    16-layer model, split-K on every projection, fails without that fix (0.12-0.19 relative) and gives
    2e-7 with it (0.44 with the reference's former de-quantized product)."""
    from qsparse_dist.config.schema import ModelConfig, SparsityConfig
    from qsparse_dist.infer.backends.decoder import KernelDecoder
    from qsparse_dist.model.reference import QSparseGPT

    torch.manual_seed(0)
    m = ModelConfig(vocab_size=64, hidden_size=256, num_layers=16, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=384, seq_length=8, ffn_activation="relu2glu")
    sp = SparsityConfig(linear="bitnet_qsparse", qkv=0.5, out=0.5, up=0.5, down=0.5)
    model = QSparseGPT(m, sp).to(DEV).float().eval()
    toks = torch.tensor([[5, 17, 3]], device=DEV)
    with torch.no_grad():
        ref = model(toks)[0]
        cfg = GemvConfig(block_n=256, block_k=4, split_k=2)  # k16 (the default) with split-K everywhere
        dec = KernelDecoder(model, max_len=8, configs={p: cfg for p in ("qkv", "out", "up", "down")})
        assert all(lay[p].mode == "ternary_k16" for lay in dec.layers for p in ("qkv", "fc1", "fc2"))
        got = torch.cat([dec.step(toks[0, p:p + 1], torch.tensor([p], device=DEV)).clone() for p in range(3)])
    assert (got - ref).norm() / ref.norm() < 1e-5


def test_split_k_ternary_equals_unsplit_bitwise(torch_ops):
    """The split-K dp4a GEMVs return exactly ``int_sum · (s_x · s_w)`` whatever the split (the
    reference's rounding), with scales that make per-partial scaling round differently."""
    from qsparse_dist.kernels.ternary_dp4a import pack_k4, pack_k16, ternary_gemv_k4, ternary_gemv_k16

    d, n = 256, 32
    g = torch.Generator().manual_seed(2)
    w_q = torch.randint(-1, 2, (n, d), generator=g).to(torch.int8)
    q = torch.randint(-128, 128, (1, d), generator=g).to(torch.int8).to(DEV)
    s_x, s_w = torch.tensor([0.0123457], device=DEV), torch.tensor(0.0313131, device=DEV)
    ref = ((q.long().cpu() @ w_q.long().t()).float() * (s_x.cpu() * s_w.cpu())).to(DEV)
    p4, p16 = pack_k4(pack_ternary(w_q)).to(DEV), pack_k16(pack_ternary(w_q), d).to(DEV)
    for split in (1, 3, 8):
        assert torch.equal(ternary_gemv_k4(q, s_x, p4, s_w, config=GemvConfig(block_n=16, block_k=2, split_k=split)),
                           ref)
        assert torch.equal(ternary_gemv_k16(q, s_x, p16, s_w, config=GemvConfig(block_n=16, block_k=1,
                                                                                   split_k=split)), ref)
