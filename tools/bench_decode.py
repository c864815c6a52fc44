"""End-to-end batch-1 greedy decode: Triton kernel decode of Q-Sparse / BitNet models vs the same model dense.

Builds :class:`qsparse_dist.model.reference.QSparseGPT` with random weights at a preset shape
(``1b``: TinyLlama-like, hidden 2048, 22 layers, FFN 5632, 32/4 heads; ``8b``: Llama-3-8B-like,
hidden 4096, 32 layers, FFN 14336, 32/8 heads; vocab 32000), wraps it in
:class:`~qsparse_dist.infer.backends.decoder.KernelDecoder`, captures one decode step in a CUDA graph and
times ``--tokens`` steps.  Before timing, fp32 parity of every kind against the reference model is
checked (``--parity-layers`` layers at the same widths; ``tools/decode_parity.py`` says how).

Kinds: ``dense`` (cuBLAS GEMVs), ``qsparse`` / ``bitnet`` / ``bitnet_qsparse``; a suffix picks a
variant: ``+pred`` predicated-row GEMVs instead of the compacted kept list, ``+bisect`` the old
bit-by-bit top-K selection and ``+radix`` the 8-bit radix select (default: radix for int8 rows,
bisection otherwise), ``+float`` the float-decoding ternary
GEMVs instead of the dp4a kernels, ``+k4`` the 4-codes-per-byte dp4a kernel instead of the default
16-codes-per-word one (``k16``; ``+k16`` names the default explicitly), ``+hist`` the top-K
selected inside the GEMVs from the prologue's key histogram (``kernels/hist_gemv.py``), ``+tuned`` the
fastest GEMV tiles of this run's per-kernel sweep, ``+wA/B`` prologue warps A for rows <= 8192 features, B above,
``+nopdl`` every Triton kernel launched without Programmatic Dependent Launch (default: with it where
supported, with the early ``launch_dependents``, ``qsparse_dist/kernels/pdl.py``), ``+wait`` PDL without the early
trigger, ``+trigger`` names the default explicitly; the table's
``pdl_gain`` is tok/s of a kind over its ``+nopdl`` twin in the same run, ``same_tokens`` the fraction of greedy
tokens they agree on.  The fp32 parity also replays the decoder through its CUDA graph (``rel_graph``, 4
positions, PDL as configured): a missing dependency wait would show there.  Also printed: the device copy
bandwidth (the ceiling), plain cuBLAS streaming the same weights (no other work), the bytes each
kind must read per token and the fraction of the copy bandwidth that the measured rate implies, and a
per-kernel table (µs and GB/s per projection).

    python tools/bench_decode.py --preset 8b --json docs/bench/decode_8b_h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import copy_bandwidth_gbs, env_info, graph_time_ms, print_table, write_json  # noqa: E402
from decode_parity import PRESETS, diagnose, model_config, sparsity_config, torch_ops  # noqa: E402

import qsparse_dist.kernels.decoder as decoder_mod  # noqa: E402
import qsparse_dist.kernels.pdl as pdl  # noqa: E402
from qsparse_dist.infer.backends.decoder import KernelDecoder  # noqa: E402
from qsparse_dist.infer.cuda_graph import GraphedStep  # noqa: E402
from qsparse_dist.kernels.decoder import prologue  # noqa: E402
from qsparse_dist.kernels.gemv import GemvConfig, default_config, gather_gemv, sparse_gemv, ternary_gemv  # noqa: E402
from qsparse_dist.kernels.hist_gemv import HIST_SIZE, hist_sparse_gemv, hist_ternary_k16  # noqa: E402
from qsparse_dist.kernels.ternary_dp4a import (  # noqa: E402
    default_k4_config,
    pack_k4,
    pack_k16,
    ternary_gemv_k4,
    ternary_gemv_k16,
)
from qsparse_dist.model.reference import QSparseGPT  # noqa: E402
from qsparse_dist.ops import kept_count, pack_ternary  # noqa: E402

PROMPT_TOKEN = 17


def decode_tokens_per_s(dec: KernelDecoder, n_tokens: int) -> tuple[float, list[int]]:
    """Greedy decode rate of the graphed step, and the tokens it produced."""
    dev = dec.residual.device
    tok = torch.full((1,), PROMPT_TOKEN, dtype=torch.long, device=dev)
    positions = torch.arange(n_tokens + 8, device=dev)
    step = GraphedStep(dec.step, (tok, positions[:1]), enabled=True)
    dec.reset()
    for p in range(4):
        tok = step(tok, positions[p:p + 1]).argmax(-1)
    dec.reset()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    toks = []
    s.record()
    for p in range(n_tokens):
        tok = step(tok, positions[p:p + 1]).argmax(-1)
        toks.append(tok)
    e.record()
    e.synchronize()
    return n_tokens / (s.elapsed_time(e) / 1e3), torch.cat(toks).tolist()


def _rel_rows(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(v) for v in ((a - b).norm(dim=-1) / b.norm(dim=-1))]


_SDPA = F.scaled_dot_product_attention


@contextlib.contextmanager
def _swapped(owner, name: str, replacement):
    """``owner.name`` replaced by ``replacement`` inside the block."""
    old = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _sdpa_float64(q, k, v, *args, **kw):
    """The reference's attention computed in float64 (the same function, other last bits)."""
    return _SDPA(q.double(), k.double(), v.double(), *args, **kw).to(q.dtype)


def graph_parity(model, dec: KernelDecoder, steps: int = 4, detail: bool = False) -> dict:
    """``rel_graph``: ``rel`` of the CUDA-graph-replayed decode over ``steps`` positions (launches exactly
    as in the timed runs, PDL included) against the reference forward of the same tokens.  ``detail``
    adds per position: the graph's rel, the eager step's (graph capture ruled out) and the reference's
    own rel against itself with float64 RMSNorms and with float64 attention (two more correct float32
    models: the noise floor of the model's float32 arithmetic at that position)."""
    from decode_parity import _rmsnorm_float64

    from qsparse_dist.model.blocks import RMSNorm

    dev = dec.residual.device
    toks = torch.randint(0, model.config.vocab_size, (1, steps), generator=torch.Generator().manual_seed(3)).to(dev)
    with torch_ops(), torch.no_grad():
        ref = model(toks)[0].float()
    with torch.no_grad():
        step = GraphedStep(dec.step, (toks[0, :1], torch.zeros(1, dtype=torch.long, device=dev)),
                           enabled=dev.type == "cuda")
        dec.reset()
        got = torch.stack([step(toks[0, p:p + 1], torch.tensor([p], device=dev))[0].float().clone()
                           for p in range(steps)])
        out = {"rel_graph": float((got - ref).norm() / ref.norm())}
        if detail:
            dec.reset()
            eager = torch.stack([dec.step(toks[0, p:p + 1], torch.tensor([p], device=dev))[0].float().clone()
                                 for p in range(steps)])
            with torch_ops(), _swapped(RMSNorm, "forward", _rmsnorm_float64):
                ref64 = model(toks)[0].float()
            with torch_ops(), _swapped(F, "scaled_dot_product_attention", _sdpa_float64):
                ref_att64 = model(toks)[0].float()
            out.update(rel_graph_pos=_rel_rows(got, ref), rel_eager_pos=_rel_rows(eager, ref),
                       rel_ref_norm64_pos=_rel_rows(ref64, ref), rel_ref_attn64_pos=_rel_rows(ref_att64, ref))
    dec.reset()
    return out


def proj_shapes(m) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of each projection, from the model's one projection table."""
    from qsparse_dist.config.shapes import projection_table

    return {p.reference.rsplit(".", 1)[-1] if p.name in ("up", "down") else p.name: (p.in_features, p.out_features)
            for p in projection_table(m).values()}


def bytes_per_token(m, kind: str, sp: float, pos: int) -> float:
    """Bytes a decode step must read at least: projection weights (kept rows only with top-K;
    2 bits per ternary weight), the bf16 LM head, the KV cache up to ``pos``."""
    tot = 0.0
    for k, n in proj_shapes(m).values():
        kk = kept_count(k, sp) if kind.endswith("qsparse") else k
        tot += kk * n * (0.25 if kind.startswith("bitnet") else 2)
    tot *= m.num_layers
    tot += m.vocab_size * m.hidden_size * 2
    tot += 2 * m.num_layers * m.query_groups * m.head_dim * pos * 2
    return tot


def cublas_stream_ms(m) -> float:
    """Plain cuBLAS: one bf16 GEMV per projection of every layer plus the LM head, nothing else."""
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(m.num_layers)
          for k, n in proj_shapes(m).values()]
    head = torch.randn(m.vocab_size, m.hidden_size, device="cuda", dtype=torch.bfloat16)
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k, _ in proj_shapes(m).values()}

    def run():
        for w in ws:
            F.linear(xs[w.shape[1]], w)
        F.linear(xs[m.hidden_size], head)

    ms = graph_time_ms(run, iters=10)
    ws = None  # noqa: F841 (free before the next allocation)
    torch.cuda.empty_cache()
    return ms


def amortized_us(fn, reps: int = 20) -> float:
    """µs per call of a small kernel: ``reps`` back-to-back calls in one graph (launch gaps as in the
    decode graph, the graph-launch and event overhead divided out)."""
    return graph_time_ms(lambda: [fn() for _ in range(reps)], iters=10) * 1e3 / reps


def kernel_table(m, sp: float, bw: float) -> list[dict]:
    """µs per call of each decode kernel at each projection shape (weights > L2: several copies)."""
    rows = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for name, (k, n) in proj_shapes(m).items():
        try:
            rows.append(_kernel_row(name, k, n, sp, bw, l2))
        except Exception as e:  # keep measuring the rest; the error is part of the record
            rows.append({"proj": name, "error": repr(e)[:300]})
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def _kernel_row(name: str, k: int, n: int, sp: float, bw: float, l2: int) -> dict:
    kk = kept_count(k, sp)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    idx = torch.empty(kk, dtype=torch.int32, device="cuda")
    q = torch.empty(1, k, dtype=torch.int8, device="cuda")
    s = torch.empty(1, device="cuda")
    r = {"proj": name, "K": k, "N": n}
    for sel in ("radix", "bisect", "swar"):
        r[f"sel_{sel}_us"] = amortized_us(lambda sel=sel: prologue(x, y, d=k, k=kk, idx_out=idx, select=sel))
    r["sel_int8_us"] = amortized_us(lambda: prologue(x, y, d=k, k=kk, q_out=(q, s)))
    r["norm_only_us"] = amortized_us(lambda: prologue(x, y, d=k, norm_weight=x[0]))
    hist = torch.zeros(HIST_SIZE, dtype=torch.int32, device="cuda")
    other = torch.zeros_like(hist)
    r["hist_prologue_us"] = amortized_us(lambda: prologue(x, y, d=k, norm_weight=x[0], hist_out=hist))
    r["hist_prologue_int8_us"] = amortized_us(lambda: prologue(x, y, d=k, q_out=(q, s), hist_out=hist))
    hist.zero_()
    prologue(x, y, d=k, hist_out=hist)  # the histogram of y (= x) the hist GEMVs below select from
    assert int(hist[:32768].sum()) == k, "histogram count"
    yrow = y.clone()
    ncopy = max(2, -(-4 * l2 // (k * n * 2)))
    wd = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(ncopy)]
    wt = [w.t().contiguous() for w in wd]
    out = torch.zeros(ncopy, 1, n, device="cuda")
    prologue(x, y, d=k, k=kk, idx_out=idx)
    vals = y[0, :kk].clone()
    xs = x.clone()
    kept = torch.zeros(k, dtype=torch.bool, device="cuda")
    kept[idx.long()] = True
    xs[0, ~kept] = 0
    r["cublas_us"] = graph_time_ms(lambda: [F.linear(x, w) for w in wd]) * 1e3 / ncopy
    cfg_g = default_config(kk, n, 1, x.device)
    cfg_p = default_config(k, n, 1, x.device)
    r["gather_us"] = graph_time_ms(lambda: [gather_gemv(vals, idx, w, n, config=cfg_g, out=out[i], out_is_zeroed=True)
                                            for i, w in enumerate(wt)]) * 1e3 / ncopy
    r["pred_us"] = graph_time_ms(lambda: [sparse_gemv(xs, w, config=cfg_p, out=out[i], out_is_zeroed=True)
                                          for i, w in enumerate(wt)]) * 1e3 / ncopy
    # selection inside the GEMV (threshold from the histogram, other buffer zeroed on the way): sweep
    try:
        hres = hist_sparse_gemv(yrow, hist, kk, wt[0]).float()
        torch.testing.assert_close(hres, xs.float() @ wt[0].float(), rtol=2e-2, atol=2e-2)
        best = None
        for bn, bk, per_sm in ((32, 256, 2), (32, 128, 4), (64, 128, 2), (32, 256, 4), (64, 256, 1), (16, 256, 4)):
            cfg = _cfg(k, n, bn, bk, per_sm)
            us = graph_time_ms(lambda cfg=cfg: [hist_sparse_gemv(yrow, hist, kk, w, config=cfg, out=out[i], out_is_zeroed=True,
                                                                 zero_hist=other) for i, w in enumerate(wt)]) * 1e3 / ncopy
            r[f"hist_{bn}x{bk}s{cfg.split_k}_us"] = us
            if best is None or us < best[0]:
                best = (us, cfg)
        r["hist_best_us"], r["hist_best_cfg"] = best[0], best[1].__dict__
        r["hist_bw_%"] = 100 * kept_b_of(kk, n) / (best[0] * 1e3) / bw
    except Exception as e:  # recorded, the other columns still measured
        r["hist_error"] = repr(e)[:300]
    wd = wt = None
    nt = max(2, -(-4 * l2 // (k * n // 4)))
    pk = [pack_ternary(torch.randint(-1, 2, (k, n), device="cuda", dtype=torch.int8)) for _ in range(nt)]
    qx = torch.randint(-127, 128, (1, k), device="cuda", dtype=torch.int8)
    one = torch.ones(1, device="cuda")
    cfg_t = default_config(k, n, 1, x.device, ternary=True)
    cfg_tg = default_config(kk, n, 1, x.device, ternary=True)
    outt = torch.zeros(nt, 1, n, device="cuda")
    r["ternary_us"] = graph_time_ms(lambda: [ternary_gemv(qx, one, w, one[0], n, skip_zeros=False, config=cfg_t,
                                                          out=outt[i], out_is_zeroed=True)
                                             for i, w in enumerate(pk)]) * 1e3 / nt
    qv = qx[0, :kk].contiguous()
    r["ternary_gather_us"] = graph_time_ms(lambda: [gather_gemv(qv, idx, w, n, x_scale=one, w_scale=one[0],
                                                                config=cfg_tg, out=outt[i], out_is_zeroed=True)
                                                    for i, w in enumerate(pk)]) * 1e3 / nt
    pk = None
    p4 = [pack_k4(pack_ternary(torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8))) for _ in range(nt)]
    cfg4 = default_k4_config(k, n, x.device)
    r["k4_us"] = graph_time_ms(lambda: [ternary_gemv_k4(qx, one, w, one[0], skip_zeros=False, config=cfg4, out=outt[i],
                                                        out_is_zeroed=True) for i, w in enumerate(p4)]) * 1e3 / nt
    p4 = None
    r["k4_bw_%"] = 100 * (k * n / 4) / (r["k4_us"] * 1e3) / bw
    try:
        w_q = torch.randint(-1, 2, (n, k), device="cuda", dtype=torch.int8)
        p16 = [pack_k16(pack_ternary(w_q), k) for _ in range(nt)]
        ref = (qx.double() @ w_q.double().t()).float()
        torch.testing.assert_close(ternary_gemv_k16(qx, one, p16[0], one[0], skip_zeros=False), ref, rtol=0, atol=0)
        best = None
        for bn, bg, per_sm, warps in ((256, 8, 4, 4), (128, 8, 4, 4), (256, 16, 2, 4), (512, 4, 4, 8), (256, 4, 8, 4),
                                      (128, 16, 4, 4)):
            cfg = _cfg(k // 16, n, bn, bg, per_sm, warps, rows_per_unit=1)
            us = graph_time_ms(lambda cfg=cfg: [ternary_gemv_k16(qx, one, w, one[0], skip_zeros=False, config=cfg,
                                                                 out=outt[i], out_is_zeroed=True)
                                                for i, w in enumerate(p16)]) * 1e3 / nt
            r[f"k16_{bn}x{bg}s{cfg.split_k}w{warps}_us"] = us
            if best is None or us < best[0]:
                best = (us, cfg)
        r["k16_best_us"], r["k16_best_cfg"] = best[0], best[1].__dict__
        r["k16_bw_%"] = 100 * (k * n / 4) / (best[0] * 1e3) / bw
        qh = torch.randint(-127, 128, (1, k), device="cuda", dtype=torch.int8)
        r["hist_k16_us"] = graph_time_ms(lambda: [hist_ternary_k16(yrow, qh, one, hist, kk, w, one[0], config=best[1],
                                                                   out=outt[i], out_is_zeroed=True, zero_hist=other)
                                                  for i, w in enumerate(p16)]) * 1e3 / nt
    except Exception as e:
        r["k16_error"] = repr(e)[:300]
    p16 = None
    dense_b, kept_b = k * n * 2, kk * n * 2
    r["cublas_bw_%"] = 100 * dense_b / (r["cublas_us"] * 1e3) / bw
    r["gather_bw_%"] = 100 * kept_b / (r["gather_us"] * 1e3) / bw
    r["ternary_bw_%"] = 100 * (k * n / 4) / (r["ternary_us"] * 1e3) / bw
    r["ternary_gather_bw_%"] = 100 * (kk * n / 4) / (r["ternary_gather_us"] * 1e3) / bw
    return r


def kept_b_of(kk: int, n: int) -> int:
    return kk * n * 2


def _cfg(rows: int, n: int, bn: int, bk: int, per_sm: int, warps: int = 4, rows_per_unit: int = 1) -> GemvConfig:
    """A tile config with split-K up to ``per_sm`` programs per SM (at least 2 tiles of rows each)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = -(-n // bn)
    split = max(1, min(-(-per_sm * sms // tiles), rows // rows_per_unit // (2 * bk)))
    return GemvConfig(block_n=bn, block_k=bk, split_k=split, num_warps=warps)


def tuned_configs(ktab: list[dict], kind: str, variants: list[str]) -> dict[str, GemvConfig] | None:
    """The per-projection best tile of the kernel sweep for this kind's GEMV (``+tuned``)."""
    key = ("k16_best_cfg" if kind.startswith("bitnet") and "k4" not in variants and "float" not in variants
           else "hist_best_cfg" if kind == "qsparse" and "hist" in variants else None)
    if key is None or not ktab:
        return None
    names = {"qkv": "qkv", "out": "out", "fc1": "up", "fc2": "down"}
    return {names[r["proj"]]: GemvConfig(**r[key]) for r in ktab if key in r and r["proj"] in names}


def _pdl_pairs(rows: list[dict]) -> None:
    """For every kind also run as ``+nopdl`` (or ``+trigger``): ``pdl_gain`` = its tok/s over the ``+nopdl``
    twin's, ``same_tokens`` = fraction of identical greedy tokens."""
    def base(spec: str) -> str:
        return "+".join(v for v in spec.split("+") if v not in ("nopdl", "trigger", "wait"))

    off = {base(r["kind"]): r for r in rows if "nopdl" in r["kind"].split("+") and "tok_per_s" in r}
    for r in rows:
        twin = off.get(base(r["kind"]))
        if twin is None or twin is r or "tok_per_s" not in r:
            continue
        r["pdl_gain"] = r["tok_per_s"] / twin["tok_per_s"]
        r["same_tokens"] = sum(a == b for a, b in zip(r["tokens"], twin["tokens"])) / max(1, len(r["tokens"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--ffn", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--kv-groups", type=int, default=None)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--kinds", default="dense,qsparse,qsparse+pred,qsparse+hist,bitnet,bitnet+k4,bitnet+tuned,"
                                       "bitnet_qsparse,bitnet_qsparse+k4,bitnet_qsparse+hist")
    ap.add_argument("--parity-layers", type=int, default=2, help="layers of the fp32 parity model (0 = skip)")
    ap.add_argument("--no-kernel-table", action="store_true")
    ap.add_argument("--no-bf16-check", action="store_true", help="skip the bf16 diagnosis of the base kinds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU")
        return 2
    t0 = time.time()
    info = env_info()
    info["command"] = "python tools/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    shape = dict(PRESETS[args.preset])
    for key in ("hidden", "layers", "ffn", "heads", "kv_groups"):
        if getattr(args, key) is not None:
            shape[key] = getattr(args, key)
    m = model_config(**shape, max_len=args.max_len)
    bw = copy_bandwidth_gbs(2 << 30)
    info["copy_bw_GBs"] = bw
    print(f"device copy bandwidth {bw:.0f} GB/s (read + write)", flush=True)
    base_kinds = sorted({k.split("+")[0] for k in args.kinds.split(",")} - {"dense"})
    parity = []
    if args.parity_layers:
        pm = model_config(**{**shape, "layers": args.parity_layers}, max_len=64)
        specs = base_kinds + ["dense"] + [k for k in args.kinds.split(",") if "k4" in k.split("+")]
        for spec in dict.fromkeys(specs):
            kind, *variants = spec.split("+")
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = QSparseGPT(pm, sparsity_config(kind, args.sparsity)).float().eval()
            try:
                dec = KernelDecoder(model, 64, dense=kind == "dense", ternary="k4" if "k4" in variants else "k16")
                row = {"kind": spec, "layers": args.parity_layers, "pdl": pdl.launch_kwargs(dec.residual.device).get("PDL", 0),
                       **diagnose(model, dec)}
                row.update(graph_parity(model, dec, detail=True))
                if row["pdl"]:  # the same replay without PDL: a missing wait would make the two differ
                    pdl_was, pdl.ENABLED = pdl.ENABLED, False
                    try:
                        row["rel_graph_nopdl"] = graph_parity(model, dec)["rel_graph"]
                    finally:
                        pdl.ENABLED = pdl_was
                row["ok_1e-5"] = max(row["rel"], row["rel_graph"]) <= 1e-5
            except Exception as e:
                row = {"kind": kind, "error": repr(e)[:300]}
            parity.append(row)
            print("fp32 parity", row, flush=True)
            del model
            torch.cuda.empty_cache()
    ktab = [] if args.no_kernel_table else kernel_table(m, args.sparsity, bw)
    cub_ms = cublas_stream_ms(m)
    dense_bytes = bytes_per_token(m, "dense", 0.0, 0)
    print(f"plain cuBLAS weight stream: {cub_ms:.3f} ms = {dense_bytes / cub_ms / 1e6 / bw:.1%} of copy bw", flush=True)
    rows, base = [], None
    for spec in args.kinds.split(","):
        kind, *variants = spec.split("+")
        warps = next((tuple(int(w) for w in v[1:].split("/")) for v in variants if v[:1] == "w" and v[1:2].isdigit()), None)
        warps = warps[0] if warps and len(warps) == 1 else warps
        sp = args.sparsity if kind.endswith("qsparse") else 0.0
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = QSparseGPT(m, sparsity_config(kind, args.sparsity)).to(torch.bfloat16).eval()
        try:
            decoder_mod.PROLOGUE_WARPS = warps
            pdl.ENABLED = False if "nopdl" in variants else None
            pdl.TRIGGER = True if "trigger" in variants else (False if "wait" in variants else None)
            dec = KernelDecoder(model, args.max_len, dense=kind == "dense", gather="pred" not in variants,
                                select=next((v for v in ("bisect", "radix", "swar") if v in variants), None),
                                ternary="float" if "float" in variants else ("k4" if "k4" in variants else "k16"),
                                hist="hist" in variants,
                                configs=tuned_configs(ktab, kind, variants) if "tuned" in variants else None)
            with torch.no_grad():
                check = kind != "dense" and (not variants or variants == ["hist"]) and not args.no_bf16_check
                bf16_rel = diagnose(model, dec) if check else {}
                pdl_mode = pdl.launch_kwargs(dec.residual.device).get("PDL", 0)
                tps, toks = decode_tokens_per_s(dec, args.tokens)
        except Exception as e:
            pdl.ENABLED = pdl.TRIGGER = None
            rows.append({"kind": spec, "error": repr(e)[:300]})
            print(rows[-1], flush=True)
            del model
            torch.cuda.empty_cache()
            continue
        nbytes = bytes_per_token(m, kind, sp, args.tokens // 2 + 4)
        row = {"kind": spec, "pdl": pdl_mode, "sparsity": sp, "tok_per_s": tps, "ms_per_tok": 1e3 / tps,
               "GB_per_tok": nbytes / 1e9, "bw_%": 100 * nbytes * tps / 1e9 / bw,
               "bf16_rel": bf16_rel.get("rel"), "bf16_rel_forced_masks": bf16_rel.get("rel_forced_masks"),
               "bf16_mask_flips": bf16_rel.get("mask_flips_total"),
               "bf16_rel_ref_perturbed": bf16_rel.get("rel_ref_vs_ref_perturbed")}
        if kind == "dense":
            base = tps
        row["vs_dense"] = tps / base if base else None
        decoder_mod.PROLOGUE_WARPS = None
        pdl.ENABLED = pdl.TRIGGER = None
        row["tokens"] = toks
        rows.append(row)
        print(row, flush=True)
        del model, dec
        torch.cuda.empty_cache()
    _pdl_pairs(rows)
    res = {"env": info, "shape": shape, "model": m.model_dump(), "tokens": args.tokens, "sparsity": args.sparsity,
           "cublas_stream_ms": cub_ms, "cublas_stream_bw_%": 100 * dense_bytes / cub_ms / 1e6 / bw,
           "parity_fp32": parity, "kernels": ktab, "rows": rows, "wall_s": time.time() - t0}
    if args.json:
        write_json(res, args.json)
    if ktab:
        print("\n== per-kernel µs (bf16 weights; ternary packed 2-bit), % of copy bandwidth ==")
        print_table(ktab, ["proj", "K", "N", "norm_only_us", "sel_bisect_us", "sel_radix_us", "sel_swar_us", "sel_int8_us",
                           "hist_prologue_us", "hist_prologue_int8_us", "cublas_us", "cublas_bw_%", "gather_us",
                           "pred_us", "hist_best_us", "hist_bw_%", "k4_us", "k4_bw_%", "k16_best_us", "k16_bw_%",
                           "hist_k16_us"])
    if parity:
        print("\n== fp32 parity vs reference ==")
        print_table(parity, list(parity[0]))
    print(f"\n== {args.preset} batch-1 greedy decode, CUDA graph per step; copy bw {bw:.0f} GB/s; "
          f"plain cuBLAS stream {100 * dense_bytes / cub_ms / 1e6 / bw:.0f}% ==")
    print_table(rows, ["kind", "pdl", "sparsity", "tok_per_s", "pdl_gain", "same_tokens", "ms_per_tok", "GB_per_tok", "bw_%", "vs_dense", "bf16_rel",
                       "bf16_rel_forced_masks", "bf16_mask_flips"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
