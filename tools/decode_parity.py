"""Where the kernel decode step and the reference model part ways: logits parity plus diagnostics.

For one model (``QSparseGPT``) and one prompt token it reports

* ``rel``: ``‖logits_kernel - logits_ref‖ / ‖logits_ref‖`` (kernel = :class:`KernelDecoder`, eager);
* ``per_proj``: every projection run alone on the *reference's* input of that projection
  (prologue select/quantize + GEMV vs ``F.linear(recipe.prepare_input(x), recipe.weight(W))``) — a
  defect of a kernel shows here whatever happens to the selection elsewhere;
* ``mask_diff``: per projection, how many kept features differ between the kernel's top-K (recorded
  in the full decode) and the top-K of the reference's own input, and the first projection that differs;
* ``rel_ref_vs_ref_norm64`` / ``rel_vs_ref_norm64``: the reference against itself with its RMSNorms
  computed in float64 (the same function, other last bits), and the kernel against that second
  reference: when two correct float32 implementations of the model already differ by about ``rel``,
  the gap is the model's conditioning (rounding flips of top-K and int8 amplified with depth), not a
  kernel defect;
* ``rel_forced``: the reference re-run with the kernel's masks forced into every top-K: if the
  difference vanishes, the full-model gap is selection flips (near-ties decided differently by
  inputs that differ in the last bits), not arithmetic.

    python tools/decode_parity.py --preset 8b --kind bitnet_qsparse --dtype fp32 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qsparse_dist.config.schema import ModelConfig, SparsityConfig  # noqa: E402

PRESETS = {  # hidden, layers, ffn, heads, kv groups
    "1b": dict(hidden=2048, layers=22, ffn=5632, heads=32, kv_groups=4),
    "8b": dict(hidden=4096, layers=32, ffn=14336, heads=32, kv_groups=8),
}
PROJ = ("qkv", "out", "fc1", "fc2")


def model_config(hidden: int, layers: int, ffn: int, heads: int, kv_groups: int, max_len: int = 512) -> ModelConfig:
    return ModelConfig(vocab_size=32000, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                       num_query_groups=kv_groups, ffn_hidden_size=ffn, seq_length=max_len,
                       ffn_activation="relu2glu")


def sparsity_config(kind: str, sp: float) -> SparsityConfig:
    return (SparsityConfig(linear=kind, qkv=sp, out=sp, up=sp, down=sp) if kind.endswith("qsparse")
            else SparsityConfig(linear=kind))


@contextlib.contextmanager
def torch_ops():
    old = os.environ.get("QSPARSE_TRITON")
    os.environ["QSPARSE_TRITON"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("QSPARSE_TRITON")
        else:
            os.environ["QSPARSE_TRITON"] = old


def _linears(model):
    for blk in model.layers:
        yield from (blk.attn.qkv, blk.attn.out, blk.ffn.fc1, blk.ffn.fc2)


def _rmsnorm_float64(self, x):
    """The reference RMSNorm's math with the mean of squares and the root in float64 (then float32, as the
    reference): the same function computed more accurately, a second reference with other last bits."""
    xf = x.double()
    y = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).float()
    return (y * self.weight.float()).to(x.dtype)


def reference_logits(model, token: int, capture: list | None = None, forced: list | None = None,
                     perturb: float = 0.0, norm64: bool = False):
    """Reference forward of one token (torch ops); ``capture`` receives each linear's input,
    ``forced`` (masks in call order) replaces every top-K; ``perturb`` multiplies the embedding
    output by ``1 + perturb·N(0, 1)`` (seeded): the model's own sensitivity to last-bit differences;
    ``norm64``: every RMSNorm computed by :func:`_rmsnorm_float64`."""
    import qsparse_dist.ops.linear as lin
    from qsparse_dist.model.blocks import RMSNorm

    hooks = []
    if perturb:
        gen = torch.Generator(device=model.embed.weight.device).manual_seed(1)
        hooks.append(model.embed.register_forward_hook(
            lambda _m, _a, out: out * (1 + perturb * torch.randn(out.shape, generator=gen, device=out.device,
                                                                 dtype=torch.float32)).to(out.dtype)))
    if capture is not None:
        hooks += [m.register_forward_pre_hook(lambda _m, a: capture.append(a[0].detach().clone()))
                  for m in _linears(model)]
    orig = lin.topk_sparsify
    if forced is not None:
        it = iter(forced)

        def fake(x, sparsity, **kw):
            return x * next(it).reshape(x.shape).to(x.dtype)

        lin.topk_sparsify = fake
    norm_forward = RMSNorm.forward
    if norm64:
        RMSNorm.forward = _rmsnorm_float64
    try:
        with torch_ops(), torch.no_grad():
            return model(torch.tensor([[token]], device=model.embed.weight.device))[0, -1].float()
    finally:
        lin.topk_sparsify = orig
        RMSNorm.forward = norm_forward
        for h in hooks:
            h.remove()


def kernel_logits(dec, token: int, record: list | None = None):
    """Eager decode step at position 0; ``record`` receives the kept mask of every top-K prologue."""
    dev = dec.residual.device
    if record is not None:
        orig = dec._input

        def spy(lin, d, **kw):
            x, extra = orig(lin, d, **kw)
            idx = extra.get("idx")
            if lin.k is not None and lin.hist:  # the GEMV selects topk_mask of the row (tests/test_hist_gemv.py)
                from qsparse_dist.ops import topk_mask

                with torch_ops():
                    record.append(topk_mask(extra.get("row", x), lin.recipe.sparsity)[0].clone())
            elif lin.k is not None:
                m = torch.zeros(d, dtype=torch.bool, device=dev)
                if idx is not None:
                    m[idx.long()] = True
                else:  # nonzero inputs: a kept value quantized to 0 reads as dropped (same product)
                    m = (x[0] if not isinstance(x, tuple) else x[0][0]) != 0
                    dec._inexact_masks = lin.quantized_input
                record.append(m.clone())
            else:
                record.append(None)
            return x, extra

        dec._input = spy
    try:
        dec.reset()
        with torch.no_grad():
            return dec.step(torch.tensor([token], device=dev), torch.zeros(1, dtype=torch.long, device=dev))[0].float()
    finally:
        if record is not None:
            del dec._input


def per_projection(dec, model, inputs: list) -> list[float]:
    """Each projection alone on the reference input: kernel prologue(select[, int8]) + GEMV."""
    from qsparse_dist.kernels.decoder import prologue

    out, it = [], iter(inputs)
    for lay, mod in zip((lay[p] for lay in dec.layers for p in PROJ), _linears(model)):
        x = next(it).reshape(1, -1).to(dec.dtype).contiguous()
        d = x.shape[1]
        with torch_ops(), torch.no_grad():
            ref = F.linear(mod.recipe.prepare_input(x), mod.recipe.weight(mod.weight)).double()
        y = torch.zeros(1, d, device=x.device, dtype=dec.dtype)
        idx = torch.zeros(d, dtype=torch.int32, device=x.device) if lay.gather else None
        res = torch.zeros(1, lay.out_features, device=x.device)
        if lay.hist:
            from qsparse_dist.kernels.hist_gemv import HIST_SIZE

            hist = torch.zeros(HIST_SIZE, dtype=torch.int32, device=x.device)
            if lay.quantized_input:
                q = torch.zeros(1, d, dtype=torch.int8, device=x.device)
                s = torch.zeros(1, device=x.device)
                prologue(x, y, d=d, q_out=(q, s), hist_out=hist)
                got = lay((q, s), res, hist=hist, row=y)
            else:
                prologue(x, y, d=d, hist_out=hist)
                got = lay(y, res, hist=hist)
            out.append(float((got.double() - ref).norm() / ref.norm()))
            continue
        if lay.quantized_input:
            q = torch.zeros(1, d, dtype=torch.int8, device=x.device)
            s = torch.zeros(1, device=x.device)
            prologue(x, y, d=d, k=lay.k, q_out=(q, s), idx_out=idx[: lay.k] if lay.gather else None, select=dec.select)
            arg = ((q[0, : lay.k] if lay.gather else q), s)
        else:
            prologue(x, y, d=d, k=lay.k, idx_out=idx[: lay.k] if lay.gather else None, select=dec.select)
            arg = y[0, : lay.k] if lay.gather else y
        got = lay(arg, res, idx[: lay.k] if lay.gather else None)
        out.append(float((got.double() - ref).norm() / ref.norm()))
    return out


def diagnose(model, dec, token: int = 17) -> dict:
    inputs: list = []
    ref = reference_logits(model, token, capture=inputs)
    masks: list = []
    got = kernel_logits(dec, token, record=masks)
    res = {"rel": float((got - ref).norm() / ref.norm())}
    eps = 2.0 ** -23 if model.embed.weight.dtype == torch.float32 else 2.0 ** -8  # ~1 ulp of the dtype
    pert = reference_logits(model, token, perturb=eps)
    res["rel_ref_vs_ref_perturbed"] = float((pert - ref).norm() / ref.norm())
    ref64 = reference_logits(model, token, norm64=True)  # the same math, other last bits in the norms
    res["rel_ref_vs_ref_norm64"] = float((ref64 - ref).norm() / ref.norm())
    res["rel_vs_ref_norm64"] = float((got - ref64).norm() / ref64.norm())
    res["per_proj_max_rel"] = max(per_projection(dec, model, inputs))
    diffs = []
    for x, m, mod in zip(inputs, masks, _linears(model)):
        if m is None:
            diffs.append(0)
            continue
        from qsparse_dist.ops import topk_mask

        with torch_ops():
            r = topk_mask(x.reshape(1, -1), mod.recipe.sparsity)[0]
        diffs.append(int((r != m).sum()) // 2)
    first = next((i for i, d in enumerate(diffs) if d), None)
    if getattr(dec, "_inexact_masks", False):  # int8 codes without kept list: flips not countable
        res["mask_flips_total"], res["first_flip"] = None, None
    else:
        res["mask_flips_total"] = sum(diffs)
        res["first_flip"] = None if first is None else f"layer {first // 4} {PROJ[first % 4]} ({diffs[first]} features)"
    if any(m is not None for m in masks):
        forced = reference_logits(model, token, forced=[m for m in masks if m is not None])
        res["rel_forced_masks"] = float((got - forced).norm() / forced.norm())
    return res


def main(argv=None) -> int:
    from qsparse_dist.infer.backends.decoder import KernelDecoder
    from qsparse_dist.model.reference import QSparseGPT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--kv-groups", type=int, default=None)
    ap.add_argument("--kinds", default="qsparse,bitnet,bitnet_qsparse")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="fp32")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--ternary", choices=["k16", "k4", "float"], default="k16", help="BitNet GEMV of the decoder")
    ap.add_argument("--hist", action="store_true", help="top-K inside the GEMVs (bf16 only; fp32 keeps the prologue select)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_parity needs a CUDA GPU (the CPU tests in tests/test_kernels.py cover small shapes)")
        return 2
    p = dict(PRESETS[args.preset])
    p["layers"] = args.layers or p["layers"]
    p["kv_groups"] = args.kv_groups or p["kv_groups"]
    m = model_config(**p)
    rows = []
    for kind in args.kinds.split(","):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = QSparseGPT(m, sparsity_config(kind, args.sparsity))
        model = model.to(torch.float32 if args.dtype == "fp32" else torch.bfloat16).eval()
        dec = KernelDecoder(model, 64, ternary=args.ternary, hist=args.hist)
        row = {"kind": kind, "dtype": args.dtype, "ternary": args.ternary, "hist": args.hist, **p,
               **diagnose(model, dec)}
        print(row, flush=True)
        rows.append(row)
        del model, dec
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
