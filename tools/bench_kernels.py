"""GPU benchmark of the Q-Sparse / BitNet Triton kernels (needs CUDA).

Decode GEMVs (batch 1 and small batches) against cuBLAS bf16 GEMV (``F.linear``), the training
top-K kernels against the torch ops, and a linear-heavy transformer block's forward+backward
(Q-Sparse 50 % with the kernels vs dense).  Every kernel is checked against a reference on the
GPU before it is timed.  Prints tables; writes everything to ``--json``.

    python tools/bench_kernels.py --json docs/bench/kernels_h100.json
"""

from __future__ import annotations

# ruff: noqa: B023  (closures are timed immediately, inside the loop that defines them)
import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _bench_common import (  # noqa: E402
    copy_bandwidth_gbs,
    eager_time_ms,
    env_info,
    graph_time_ms,
    print_table,
    write_json,
)

from qsparse_dist.kernels.gemv import gather_gemv, sparse_gemv, ternary_gemv  # noqa: E402
from qsparse_dist.kernels.topk import quantize_rows_int8, topk_rows  # noqa: E402
from qsparse_dist.kernels.tune import SPARSE_TILES, TERNARY_TILES, candidate_configs  # noqa: E402
from qsparse_dist.ops import kept_count, pack_ternary, topk_sparsify  # noqa: E402

SHAPES = {  # name: (K in, N out); the ~1B model's projections, then larger squares
    "1B.qkv 2048x2560": (2048, 2560),
    "1B.out 2048x2048": (2048, 2048),
    "1B.fc1 2048x11264": (2048, 11264),
    "1B.fc2 5632x2048": (5632, 2048),
    "4096x4096": (4096, 4096),
    "8192x8192": (8192, 8192),
}


class TorchOps:
    """Context: force the torch path of qsparse_dist.ops (the reference)."""

    def __enter__(self):
        self.old = os.environ.get("QSPARSE_TRITON")
        os.environ["QSPARSE_TRITON"] = "0"

    def __exit__(self, *a):
        if self.old is None:
            os.environ.pop("QSPARSE_TRITON", None)
        else:
            os.environ["QSPARSE_TRITON"] = self.old


def _configs(tiles, k, n, sms, quick):
    return candidate_configs(tiles[:2] if quick else tiles, k, n, sms, (4,) if quick else (2, 4, 8))


def _copies(nbytes: int, l2: int) -> int:
    return int(max(2, min(256, -(-4 * l2 // max(nbytes, 1)))))


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def bench_gemv(args, sms, l2, batch: int = 1):
    rows, best_cfgs = [], {}
    dev = "cuda"
    for name, (k, n) in SHAPES.items():
        if args.quick and k > 4096:
            continue
        torch.manual_seed(0)
        x = torch.randn(batch, k, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        r_dense = _copies(n * k * 2, l2)
        ws = [w] + [torch.randn_like(w) * 0.02 for _ in range(r_dense - 1)]
        wts = [t.t().contiguous() for t in ws]
        w_q = torch.randint(-1, 2, (n, k), device=dev, dtype=torch.int8)
        r_tern = _copies(k * ((n + 3) // 4), l2)
        packs = [pack_ternary(w_q.t().contiguous())]
        packs += [pack_ternary(torch.randint(-1, 2, (k, n), device=dev, dtype=torch.int8))
                  for _ in range(r_tern - 1)]
        s_w = torch.tensor(0.02, device=dev)
        row = {"shape": name, "batch": batch, "K": k, "N": n}

        outs = torch.empty(r_dense, batch, n, device=dev, dtype=torch.bfloat16)

        def dense():
            for i, t in enumerate(ws):
                torch.mm(x, t.t(), out=outs[i])

        row["dense_us"] = graph_time_ms(dense) * 1e3 / r_dense
        row["dense_GBs"] = n * k * 2 / row["dense_us"] / 1e3

        for sp in (0.5, 0.7):
            with TorchOps():
                xs = topk_sparsify(x, sp)
            kept = int((xs != 0).any(0).sum())
            ref = xs.double() @ w.double().t()
            acc = torch.zeros(r_dense, batch, n, device=dev, dtype=torch.float32)
            best = None
            for cfg in _configs(SPARSE_TILES, k, n, sms, args.quick):
                y = sparse_gemv(xs, wts[0], config=cfg)
                err = _rel(y, ref)
                assert err < 1e-3, (name, cfg, err)

                def run(cfg=cfg):
                    acc.zero_()  # one memset per step (the decode workspace), amortized over R calls
                    for i, t in enumerate(wts):
                        sparse_gemv(xs, t, config=cfg, out=acc[i], out_is_zeroed=True)

                us = graph_time_ms(run, iters=15 if not args.quick else 8) * 1e3 / r_dense
                if best is None or us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            tag = f"sparse{int(sp * 100)}"
            row[f"{tag}_us"], row[f"{tag}_x"] = us, row["dense_us"] / us
            row[f"{tag}_GBs"] = kept * n * 2 / us / 1e3
            row[f"{tag}_cfg"] = str(cfg)
            best_cfgs[(name, tag)] = cfg
            if sp == 0.5:  # with the top-K selection kernel in front (decode prologue)
                kk = kept_count(k, sp)

                def run_topk(cfg=cfg):
                    acc.zero_()
                    for i, t in enumerate(wts):
                        sparse_gemv(topk_rows(x, kk)["y"], t, config=cfg, out=acc[i], out_is_zeroed=True)

                us2 = graph_time_ms(run_topk, iters=10) * 1e3 / r_dense
                row["sparse50+topk_us"], row["sparse50+topk_x"] = us2, row["dense_us"] / us2

        if batch == 1:  # compacted kept list + gather GEMV (what the decoder runs at batch 1)
            for sp in (0.5, 0.7):
                kk = kept_count(k, sp)
                lst = topk_rows(x, kk, write_idx=True, write_y=False)
                with TorchOps():
                    ref = topk_sparsify(x, sp).double() @ w.double().t()
                acc = torch.zeros(r_dense, batch, n, device=dev, dtype=torch.float32)
                best = None
                for cfg in _configs(SPARSE_TILES, kk, n, sms, args.quick):
                    err = _rel(gather_gemv(lst["vals"], lst["idx"], wts[0], n, config=cfg), ref)
                    assert err < 1e-3, (name, cfg, err)

                    def run(cfg=cfg):
                        acc.zero_()
                        for i, t in enumerate(wts):
                            gather_gemv(lst["vals"], lst["idx"], t, n, config=cfg, out=acc[i], out_is_zeroed=True)

                    us = graph_time_ms(run, iters=15) * 1e3 / r_dense
                    if best is None or us < best[0]:
                        best = (us, cfg)
                us, cfg = best
                tag = f"gather{int(sp * 100)}"
                row[f"{tag}_us"], row[f"{tag}_x"] = us, row["dense_us"] / us
                row[f"{tag}_GBs"] = kk * n * 2 / us / 1e3
                row[f"{tag}_cfg"] = str(cfg)

                def run_topk(cfg=cfg, kk=kk):
                    acc.zero_()
                    for i, t in enumerate(wts):
                        lt = topk_rows(x, kk, write_idx=True, write_y=False)
                        gather_gemv(lt["vals"], lt["idx"], t, n, config=cfg, out=acc[i], out_is_zeroed=True)

                us2 = graph_time_ms(run_topk, iters=10) * 1e3 / r_dense
                row[f"{tag}+topk_us"], row[f"{tag}+topk_x"] = us2, row["dense_us"] / us2

            kk = kept_count(k, 0.5)
            lst = topk_rows(x, kk, write_idx=True, write_y=False, quant=2)
            from qsparse_dist.ops import fake_quant_activation_int8

            with TorchOps():
                ref = fake_quant_activation_int8(topk_sparsify(x.float(), 0.5)).double() @ (w_q.double() * 0.02).t()
            acc = torch.zeros(r_tern, batch, n, device=dev, dtype=torch.float32)
            best = None
            for cfg in _configs(TERNARY_TILES, kk, n, sms, args.quick):
                y = gather_gemv(lst["vals"], lst["idx"], packs[0], n, x_scale=lst["scale"], w_scale=s_w, config=cfg)
                err = _rel(y, ref)
                assert err < 1e-4, (name, "ternary gather", cfg, err)

                def run(cfg=cfg):
                    acc.zero_()
                    for i, p in enumerate(packs):
                        gather_gemv(lst["vals"], lst["idx"], p, n, x_scale=lst["scale"], w_scale=s_w, config=cfg,
                                    out=acc[i], out_is_zeroed=True)

                us = graph_time_ms(run, iters=15) * 1e3 / r_tern
                if best is None or us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            row["ternary_gather50_us"], row["ternary_gather50_x"] = us, row["dense_us"] / us
            row["ternary_gather50_GBs"] = kk * n / 4 / us / 1e3
            row["ternary_gather50_cfg"] = str(cfg)

            def run_q(cfg=cfg, kk=kk):
                acc.zero_()
                for i, p in enumerate(packs):
                    lt = topk_rows(x, kk, write_idx=True, write_y=False, quant=2)
                    gather_gemv(lt["vals"], lt["idx"], p, n, x_scale=lt["scale"], w_scale=s_w, config=cfg,
                                out=acc[i], out_is_zeroed=True)

            us2 = graph_time_ms(run_q, iters=10) * 1e3 / r_tern
            row["ternary_gather50+quant_us"], row["ternary_gather50+quant_x"] = us2, row["dense_us"] / us2

        for tag, sp in (("ternary", None), ("ternary_sparse50", 0.5)):
            q, s_x = quantize_rows_int8(x, sp)
            with TorchOps():
                xin = topk_sparsify(x.float(), sp) if sp else x.float()
            from qsparse_dist.ops import fake_quant_activation_int8

            ref = fake_quant_activation_int8(xin).double() @ (w_q.double() * 0.02).t()
            kept = int((q != 0).any(0).sum())
            acc = torch.zeros(r_tern, batch, n, device=dev, dtype=torch.float32)
            best = None
            for cfg in _configs(TERNARY_TILES, k, n, sms, args.quick):
                y = ternary_gemv(q, s_x, packs[0], s_w, n, skip_zeros=sp is not None, config=cfg)
                err = _rel(y, ref)
                assert err < 1e-4, (name, tag, cfg, err)

                def run(cfg=cfg, sp=sp):
                    acc.zero_()
                    for i, p in enumerate(packs):
                        ternary_gemv(q, s_x, p, s_w, n, skip_zeros=sp is not None, config=cfg,
                                     out=acc[i], out_is_zeroed=True)

                us = graph_time_ms(run, iters=15 if not args.quick else 8) * 1e3 / r_tern
                if best is None or us < best[0]:
                    best = (us, cfg)
            us, cfg = best
            row[f"{tag}_us"], row[f"{tag}_x"] = us, row["dense_us"] / us
            row[f"{tag}_GBs"] = kept * ((n + 3) // 4) / us / 1e3
            row[f"{tag}_cfg"] = str(cfg)
            best_cfgs[(name, tag)] = cfg

            def run_q(cfg=cfg, sp=sp):  # with the int8 (+top-K) quantization kernel in front
                acc.zero_()
                for i, p in enumerate(packs):
                    qq, ss = quantize_rows_int8(x, sp)
                    ternary_gemv(qq, ss, p, s_w, n, skip_zeros=sp is not None, config=cfg,
                                 out=acc[i], out_is_zeroed=True)

            us2 = graph_time_ms(run_q, iters=10) * 1e3 / r_tern
            row[f"{tag}+quant_us"], row[f"{tag}+quant_x"] = us2, row["dense_us"] / us2
        rows.append(row)
        print(f"[gemv b={batch}] {name}: " + ", ".join(
            f"{c}={row[c]:.3g}" for c in row if c.endswith("_x") or c == "dense_us")
            + " | " + "; ".join(f"{c}={row[c]}" for c in row if c.endswith("_cfg")), flush=True)
        ws = wts = packs = None
        torch.cuda.empty_cache()
    return rows


def bench_train_topk(args):
    rows = []
    for t, d, block in ((8192, 2048, None), (8192, 5632, None), (8192, 2048, 32)):
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = {"op": f"top-K 50% [{t},{d}]" + (f" N:M 16:{block}" if block else ""), "tokens": t, "d": d}
        with TorchOps():
            ref = topk_sparsify(x, 0.5, block_size=block)
            row["torch_fwd_ms"] = eager_time_ms(lambda: topk_sparsify(x, 0.5, block_size=block))
            from qsparse_dist.ops import fake_quant_activation_int8

            refq = fake_quant_activation_int8(ref)
            row["torch_fwd_quant_ms"] = eager_time_ms(
                lambda: fake_quant_activation_int8(topk_sparsify(x, 0.5, block_size=block)))
        from qsparse_dist.kernels.topk import topk_sparsify_triton

        y = topk_sparsify_triton(x, 0.5, block_size=block)
        yq = topk_sparsify_triton(x, 0.5, block_size=block, quantize=True)
        row["mask_identical"] = bool(torch.equal(y, ref))
        row["quant_identical"] = bool(torch.equal(yq, refq))
        with TorchOps():  # torch on CUDA divides by the scalar 127 as x * (1/127): compare with the CPU op too
            xc = x.detach().cpu()
            refq_cpu = fake_quant_activation_int8(topk_sparsify(xc, 0.5, block_size=block))
        row["quant_identical_vs_cpu_torch"] = bool(torch.equal(yq.cpu(), refq_cpu))
        import qsparse_dist.kernels.topk as tk

        tk.TWO_BITS_OVERRIDE = True
        assert torch.equal(topk_sparsify_triton(x, 0.5, block_size=block), ref)
        row["triton_2bit_fwd_ms"] = eager_time_ms(lambda: topk_sparsify_triton(x, 0.5, block_size=block))
        tk.TWO_BITS_OVERRIDE = None
        row["triton_fwd_ms"] = eager_time_ms(lambda: topk_sparsify_triton(x, 0.5, block_size=block))
        row["triton_fwd_quant_ms"] = eager_time_ms(
            lambda: topk_sparsify_triton(x, 0.5, block_size=block, quantize=True))
        row["speedup"] = row["torch_fwd_ms"] / row["triton_fwd_ms"]
        row["triton_GBs"] = 2 * x.numel() * 2 / row["triton_fwd_ms"] / 1e6
        rows.append(row)
        print(f"[train top-K] {row}", flush=True)
    return rows


TRAIN_1P3B = (  # (label, tokens, width, sparsity, N:M block): the gpu-1.3b preset's top-K inputs per micro-batch
    ("qkv/out/up 40%", 16384, 2048, 0.4, None),
    ("down 50%", 16384, 5504, 0.5, None),
    ("qkv/out/up 40% N:M /32", 16384, 2048, 0.4, 32),
    ("down 50% N:M /32", 16384, 5504, 0.5, 32),
)


def bench_train_topk_1p3b(args, copy_gbs: float):
    """ms per call of every applicable selection kernel (``topk.SELECT_OVERRIDE``: bisect, swar) on
    the 1.3B training shapes, bf16: top-K (``y = x ⊙ M``) and BitNet's top-K + int8 codes
    (``quant=3``), each checked against the torch ops first; achieved read+write bandwidth vs the copy
    bandwidth; the autotuner's time per launch config (GPU time, L2 flushed); the earlier BitNet
    path (top-K kernel, then the torch codes) for comparison."""
    import qsparse_dist.kernels.topk as tk
    from qsparse_dist.kernels.codes_scale import topk_codes_triton
    from qsparse_dist.ops import int8_codes_ste

    rows = []
    families = args.families.split(",") if args.families else None
    for label, t, d, sp, block in TRAIN_1P3B[:3] if args.quick else TRAIN_1P3B:
        torch.manual_seed(0)
        x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        with TorchOps():
            ref = topk_sparsify(x, sp, block_size=block)
            ref_q, ref_s = int8_codes_ste(ref)
        with TorchOps():  # the CPU op divides by 127 exactly, as the kernels do; CUDA torch multiplies by 1/127
            cpu_q, cpu_s = int8_codes_ste(topk_sparsify(x.cpu(), sp, block_size=block))
        x2d = x.reshape(-1, block or d)
        kk = kept_count(block or d, sp)
        fams = [f for f in tk._families(block or d, kk, 0, False, False) if families is None or f in families]
        nbytes = 2 * 2 * x.numel()  # read x, write y (bf16)
        y_copy = torch.empty_like(x)
        copy_ms = eager_time_ms(lambda: y_copy.copy_(x), iters=20)
        y_copy = None
        for fam in fams:
            tk.SELECT_OVERRIDE = fam
            row = {"op": label, "family": fam, "shape": f"[{t},{d}]", "same_bytes_copy_ms": copy_ms}
            try:
                row["mask_identical"] = bool(torch.equal(topk_rows(x2d, kk)["y"].reshape(x.shape), ref))
            except Exception as e:  # noqa: BLE001  (recorded; the other families still run)
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                rows.append(row)
                print(f"[train top-K 1.3B] {row}", flush=True)
                continue
            row["topk_ms"] = eager_time_ms(lambda: topk_rows(x2d, kk), iters=20)
            row["topk_GBs"] = nbytes / row["topk_ms"] / 1e6
            row["topk_of_copy"] = row["topk_GBs"] / copy_gbs
            tuned = {"bisect": tk._topk_rows_kernel_tuned, "swar": tk._topk_rows_swar_kernel_tuned}[fam]
            timings = getattr(tuned, "configs_timings", None) or {}
            row["tune_ms"] = "; ".join(f"{c}: {(v[0] if isinstance(v, (list, tuple)) else v):.4f}"
                                       for c, v in timings.items())
            if block is None or fam == "bisect":
                q, s = topk_codes_triton(x, sp, block_size=block)
                row["codes_identical_vs_cuda_torch"] = bool(torch.equal(q, ref_q) and torch.equal(s, ref_s))
                row["codes_identical_vs_cpu_torch"] = bool(torch.equal(q.cpu(), cpu_q) and torch.equal(s.cpu(), cpu_s))
                row["codes_ms"] = eager_time_ms(lambda: topk_codes_triton(x, sp, block_size=block), iters=20)
                row["codes_GBs"] = nbytes / row["codes_ms"] / 1e6
            rows.append(row)
            print(f"[train top-K 1.3B] {row}", flush=True)
        tk.SELECT_OVERRIDE = None
        old_ms = eager_time_ms(lambda: int8_codes_ste(topk_sparsify(x, sp, block_size=block)), iters=20)
        rows.append({"op": label, "family": "top-K kernel, then torch codes (before)", "shape": f"[{t},{d}]",
                     "old_bitnet_path_ms": old_ms})
        print(f"[train top-K 1.3B] {rows[-1]}", flush=True)
        x = ref = ref_q = cpu_q = None
        torch.cuda.empty_cache()
    return rows


def bench_bitnet_scales(args, copy_gbs: float):
    """BitNet's scales after the integer-code matmul on the 1.3B outputs (``[16384, N]`` bf16, N =
    qkv 6144 / out 2048 / fc1 11008): torch ``(y_int * (s_x*s_w)).to(bf16)`` + its backward against
    the one-pass kernel (:mod:`qsparse_dist.kernels.codes_scale`), bitwise compared first."""
    from qsparse_dist.kernels.codes_scale import scale_codes_product_triton
    from qsparse_dist.ops.linear import scale_codes_product

    rows = []
    for n in (6144, 2048, 11008):
        y = (torch.randint(-4000, 4000, (16384, n), device="cuda").float()).to(torch.bfloat16).requires_grad_()
        s_x = torch.rand(16384, 1, device="cuda") * 0.05 + 1e-3
        s_w = torch.tensor(0.0173, device="cuda")
        g = torch.randn(16384, n, device="cuda", dtype=torch.bfloat16)
        row = {"op": f"scale codes product [16384,{n}] fwd+bwd"}
        with TorchOps():
            ref = scale_codes_product(y, s_x, s_w, torch.bfloat16)
            (ref_g,) = torch.autograd.grad(ref, y, g)
        out = scale_codes_product_triton(y, s_x, s_w, torch.bfloat16)
        (out_g,) = torch.autograd.grad(out, y, g)
        row["identical"] = bool(torch.equal(out, ref) and torch.equal(out_g, ref_g))
        with TorchOps():
            row["torch_ms"] = eager_time_ms(
                lambda: torch.autograd.grad(scale_codes_product(y, s_x, s_w, torch.bfloat16), y, g), iters=10)
        row["kernel_ms"] = eager_time_ms(
            lambda: torch.autograd.grad(scale_codes_product_triton(y, s_x, s_w, torch.bfloat16), y, g), iters=10)
        row["kernel_GBs"] = 2 * 2 * 2 * y.numel() / row["kernel_ms"] / 1e6  # fwd + bwd, 16-bit in and out
        row["kernel_of_copy"] = row["kernel_GBs"] / copy_gbs
        rows.append(row)
        print(f"[bitnet scales] {row}", flush=True)
        y = g = ref = out = ref_g = out_g = None
        torch.cuda.empty_cache()
    return rows


def bench_row_topk(args):
    """Latency of the top-K selection on one token row (decode), 1-bit vs 2-bit radix steps."""
    import qsparse_dist.kernels.topk as tk

    rows = []
    for d in (2048, 5632, 8192):
        x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
        kk = kept_count(d, 0.5)
        row = {"op": f"decode top-K 50% [1,{d}]"}
        for two in (False, True):
            tk.TWO_BITS_OVERRIDE = two
            with TorchOps():
                ref = topk_sparsify(x, 0.5)
            assert torch.equal(topk_rows(x, kk)["y"], ref)

            def run():
                for _ in range(50):
                    topk_rows(x, kk)

            row["2bit_us" if two else "1bit_us"] = graph_time_ms(run, iters=10) * 1e3 / 50
        tk.TWO_BITS_OVERRIDE = None
        rows.append(row)
        print(f"[row top-K] {row}", flush=True)
    return rows


def bench_train_block(args):
    """Forward+backward of one reference transformer block (attention + GLU FFN), bf16."""
    from qsparse_dist.config.schema import ModelConfig, SparsityConfig
    from qsparse_dist.model.reference import Block, rope_cache

    b, s = (2, 2048) if args.quick else (4, 2048)
    m = ModelConfig(vocab_size=32000, hidden_size=2048, num_layers=1, num_attention_heads=16,
                    ffn_hidden_size=5632, seq_length=s)
    cos, sin = rope_cache(s, m.head_dim, m.rope_theta, "cuda")
    rows = []
    times = {}
    for label, sp_cfg, torch_path in (
        ("dense", SparsityConfig(linear="dense"), False),
        ("qsparse50 (triton)", SparsityConfig(linear="qsparse"), False),
        ("qsparse50 (torch ops)", SparsityConfig(linear="qsparse"), True),
        ("bitnet_qsparse50 (triton)", SparsityConfig(linear="bitnet_qsparse"), False),
    ):
        torch.manual_seed(0)
        with torch.device("cuda"):
            blk = Block(m, sp_cfg).to(torch.bfloat16)
        x = torch.randn(b, s, m.hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)

        def step():
            y, _ = blk(x, cos, sin)
            y.backward(gy)

        if torch_path:
            with TorchOps():
                ms = eager_time_ms(step, iters=10)
        else:
            ms = eager_time_ms(step, iters=10)
        times[label] = ms
        p_lin = sum(mod.weight.numel() for mod in (blk.attn.qkv, blk.attn.out, blk.ffn.fc1, blk.ffn.fc2))
        flops = 6 * b * s * p_lin + 6 * b * s * s * m.hidden_size  # causal attention: half of 12·s·d
        rows.append({"block": label, "tokens": b * s, "fwd_bwd_ms": ms, "TFLOPs": flops / ms / 1e9,
                     "MFU_vs_989": flops / ms / 1e9 / 989.4,
                     "vs_dense": ms / times["dense"]})
        print(f"[train block] {rows[-1]}", flush=True)
        blk = x = gy = None
        torch.cuda.empty_cache()
    return rows


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = eager_time_ms(lambda: a @ b, iters=10)
    return 2 * 8192**3 / ms / 1e9


def _save(res: dict, path: str | None) -> None:
    if path:  # after every section, so a run cut short keeps what it measured
        write_json(res, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and configs")
    ap.add_argument("--families", default=None,
                    help="train_topk: comma list of selection families to time (default: every applicable one)")
    ap.add_argument("--only", default="gemv,batch,topk,block",
                    help="comma list of sections: gemv, batch, topk, train_topk (1.3B training shapes), block")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (the kernels are tested on CPU by tests/test_kernels.py)")
        return 2
    t0 = time.time()
    info = env_info()
    info["copy_GBs_read+write"] = copy_bandwidth_gbs()
    info["matmul_bf16_TFLOPs"] = matmul_tflops()
    info["command"] = "python tools/bench_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(info, flush=True)
    sms = info["sms"]
    l2 = info["l2_bytes"] or 50 * 2**20
    res: dict = {"env": info}
    only = set(args.only.split(","))
    if "gemv" in only:
        res["gemv_b1"] = bench_gemv(args, sms, l2, 1)
        _save(res, args.json)
    if "batch" in only:
        res["gemv_b4"] = bench_gemv(argparse.Namespace(quick=True), sms, l2, 4)
        _save(res, args.json)
    if "topk" in only:
        res["row_topk"] = bench_row_topk(args)
        res["train_topk"] = bench_train_topk(args)
        _save(res, args.json)
    if "train_topk" in only:
        res["train_topk_1p3b"] = bench_train_topk_1p3b(args, info["copy_GBs_read+write"])
        _save(res, args.json)
        res["bitnet_scales"] = bench_bitnet_scales(args, info["copy_GBs_read+write"])
        _save(res, args.json)
    if "block" in only:
        res["train_block"] = bench_train_block(args)
        _save(res, args.json)
    res["wall_s"] = time.time() - t0
    if args.json:
        write_json(res, args.json)
    cols = ["shape", "dense_us", "dense_GBs", "sparse50_x", "sparse70_x", "gather50_x", "gather50_GBs", "gather70_x",
            "gather50+topk_x", "ternary_x", "ternary_GBs", "ternary+quant_x", "ternary_sparse50_x",
            "ternary_gather50_x", "ternary_gather50+quant_x"]
    for key in ("gemv_b1", "gemv_b4"):
        if key in res:
            print(f"\n== {key} (ratios = dense cuBLAS bf16 time / kernel time) ==")
            print_table(res[key], cols)
    if "train_topk" in res:
        print("\n== training top-K (bf16, forward) ==")
        print_table(res["row_topk"], ["op", "1bit_us", "2bit_us"])
        print_table(res["train_topk"], ["op", "torch_fwd_ms", "triton_fwd_ms", "triton_2bit_fwd_ms", "speedup",
                                        "triton_GBs",
                                        "torch_fwd_quant_ms", "triton_fwd_quant_ms", "mask_identical",
                                        "quant_identical", "quant_identical_vs_cpu_torch"])
    if "train_topk_1p3b" in res:
        print("\n== training top-K on the 1.3B shapes (bf16; GB/s = read x + write y) ==")
        print_table(res["train_topk_1p3b"], ["op", "family", "mask_identical", "same_bytes_copy_ms", "topk_ms",
                                             "topk_GBs", "topk_of_copy",
                                             "codes_ms", "codes_GBs", "codes_identical_vs_cuda_torch",
                                             "codes_identical_vs_cpu_torch",
                                             "old_bitnet_path_ms"])
    if "bitnet_scales" in res:
        print_table(res["bitnet_scales"], ["op", "identical", "torch_ms", "kernel_ms", "kernel_GBs", "kernel_of_copy"])
    if "train_block" in res:
        print("\n== transformer block fwd+bwd ==")
        print_table(res["train_block"], ["block", "tokens", "fwd_bwd_ms", "TFLOPs", "MFU_vs_989", "vs_dense"])
    print(f"\ncopy bandwidth {info['copy_GBs_read+write']:.0f} GB/s (read+write), "
          f"bf16 matmul {info['matmul_bf16_TFLOPs']:.0f} TFLOP/s, wall {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
