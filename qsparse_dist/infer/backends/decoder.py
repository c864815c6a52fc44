"""A batch-1 decode step of :class:`~qsparse_dist.model.reference.QSparseGPT` assembled from the Triton
kernels of :mod:`qsparse_dist.kernels.decoder`, ready for CUDA-graph capture
(``qsparse_dist.infer.cuda_graph.GraphedStep``).  Used by ``tools/bench_decode.py``,
``tools/decode_parity.py`` and the kernel tests; ``generate`` decodes through the runtime backends
(:mod:`.kernels`) instead.

Per layer, 10 launches, every shape static, every position read from a device tensor::

    prologue(+residual, RMSNorm, top-K[, int8])  -> qkv GEMV -> RoPE + KV-cache write -> attention
    prologue(top-K[, int8])                      -> out GEMV
    prologue(+residual, RMSNorm, top-K[, int8])  -> fc1 GEMV
    prologue(GLU activation, top-K[, int8])      -> fc2 GEMV       (its residual add: next prologue)

Kernel details (prologue fusion, GEMV choice per projection): :mod:`qsparse_dist.kernels.decoder`.
GEMV outputs are float32 slices of one workspace zeroed once per step (split-K accumulates into it).
The residual stream is float32.  MoE and N:M (block) projections are not supported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...kernels.decoder import DecodeLinear, decode_attention, prologue, rope_kv_write
from ...kernels.gemv import GemvConfig
from ...kernels.hist_gemv import HIST_SIZE
from ...model.blocks import rope_cache
from ...ops import LinearRecipe

__all__ = ["KernelDecoder"]


class KernelDecoder:
    """Batch-1 greedy decode of a dense-FFN :class:`QSparseGPT` with the Triton kernels.

    ``step(token [1] int64, pos [1] int64) -> logits [1, V]`` (float32) reads and writes only
    preallocated buffers, so ``GraphedStep(decoder.step, (token, pos))`` captures it.
    """

    def __init__(self, model, max_len: int, *, dense: bool = False, dtype: torch.dtype | None = None,
                 configs: dict[str, GemvConfig] | None = None, gather: bool = True, select: str | None = None,
                 ternary: str = "k16", hist: bool = False) -> None:
        m, sp = model.config, model.sparsity
        self.select = select
        if m.moe is not None:
            raise ValueError("KernelDecoder supports dense-FFN models only (model.moe is set)")
        if getattr(m, "qkv_bias", False):
            raise ValueError("KernelDecoder does not support model.qkv_bias yet")
        dev = model.embed.weight.device
        self.dtype = dtype or model.embed.weight.dtype
        self.nh, self.ng, self.hd, self.h = m.num_attention_heads, m.query_groups, m.head_dim, m.hidden_size
        self.ffn, self.act, self.eps, self.max_len = m.ffn_size, m.ffn_activation, m.norm_eps, max_len
        configs = configs or {}
        recipes = {p: (LinearRecipe() if dense else sp.recipe(p)) for p in ("qkv", "out", "up", "down")}
        self.embed = model.embed.weight.detach().to(self.dtype)
        head = model.embed.weight if model.lm_head is None else model.lm_head.weight
        self.lm_head = head.detach().to(self.dtype).contiguous()
        self.final_norm = model.final_norm.weight.detach().float()
        self.layers = []
        for blk in model.layers:
            self.layers.append({
                "attn_norm": blk.attn_norm.weight.detach().float(),
                "ffn_norm": blk.ffn_norm.weight.detach().float(),
                "qkv": DecodeLinear(blk.attn.qkv.weight, recipes["qkv"], self.dtype, configs.get("qkv"), gather, ternary,
                                    hist),
                "out": DecodeLinear(blk.attn.out.weight, recipes["out"], self.dtype, configs.get("out"), gather, ternary,
                                    hist),
                "fc1": DecodeLinear(blk.ffn.fc1.weight, recipes["up"], self.dtype, configs.get("up"), gather, ternary,
                                    hist),
                "fc2": DecodeLinear(blk.ffn.fc2.weight, recipes["down"], self.dtype, configs.get("down"), gather,
                                    ternary, hist),
            })
        nqkv = (self.nh + 2 * self.ng) * self.hd
        sizes = [nqkv, self.h, 2 * self.ffn, self.h]
        # one memset per step zeroes the GEMV outputs (split-K adds into them) and both key histograms
        n_ws = len(self.layers) * sum(sizes)
        self._zeroed = torch.zeros(n_ws + 2 * HIST_SIZE, device=dev, dtype=torch.float32)
        self.workspace = self._zeroed[:n_ws].view(len(self.layers), sum(sizes))
        self.hist = self._zeroed[n_ws:].view(torch.int32).view(2, HIST_SIZE)
        self._hist_cur = 0
        self.outs = [dict(zip(("qkv", "out", "fc1", "fc2"), ws.split(sizes))) for ws in self.workspace]
        self.residual = torch.zeros(1, self.h, device=dev, dtype=torch.float32)
        width = max(self.h, self.ffn, self.nh * self.hd)
        self.act_buf = torch.zeros(1, width, device=dev, dtype=self.dtype)
        self.q_buf = torch.zeros(1, width, device=dev, dtype=torch.int8)
        self.s_buf = torch.zeros(1, device=dev, dtype=torch.float32)
        self.idx_buf = torch.zeros(width, device=dev, dtype=torch.int32)
        self.q_rot = torch.zeros(self.nh * self.hd, device=dev, dtype=torch.float32)
        self.attn_out = torch.zeros(1, self.nh * self.hd, device=dev, dtype=self.dtype)
        cache_dtype = self.dtype
        self.k_cache = torch.zeros(len(self.layers), self.ng, max_len, self.hd, device=dev, dtype=cache_dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.cos, self.sin = (t.contiguous() for t in rope_cache(max_len, self.hd, m.rope_theta, dev))

    def _input(self, lin: DecodeLinear, d: int, **kw):
        """Prologue for ``lin``'s input; returns what ``lin`` takes and the keywords of its call (the
        kept indices, or the histograms: this one, and the other one that the GEMV zeroes)."""
        y = self.act_buf[:, :d]
        if lin.hist:
            hist, other = self.hist[self._hist_cur], self.hist[1 - self._hist_cur]
            self._hist_cur = 1 - self._hist_cur
            extra = {"hist": hist, "zero_hist": other}
            if lin.quantized_input:
                q = self.q_buf[:, :d]
                prologue(kw.pop("inp"), y, d=d, q_out=(q, self.s_buf), hist_out=hist, **kw)
                return (q, self.s_buf), {**extra, "row": y}
            prologue(kw.pop("inp"), y, d=d, hist_out=hist, **kw)
            return y, extra
        idx = self.idx_buf[: lin.k] if lin.gather else None
        if lin.quantized_input:
            q = self.q_buf[:, :d]
            prologue(kw.pop("inp"), y, d=d, k=lin.k, q_out=(q, self.s_buf), idx_out=idx, select=self.select, **kw)
            return ((q[0, : lin.k] if lin.gather else q), self.s_buf), {"idx": idx}
        prologue(kw.pop("inp"), y, d=d, k=lin.k, idx_out=idx, select=self.select, **kw)
        return (y[0, : lin.k] if lin.gather else y), {"idx": idx}

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self._zeroed.zero_()
        self._hist_cur = 0
        self.residual.copy_(self.embed.index_select(0, token).float())
        h, prev = self.h, None
        for i, (lay, outs) in enumerate(zip(self.layers, self.outs)):
            if prev is None:
                x, call_kw = self._input(lay["qkv"], h, inp=self.residual, norm_weight=lay["attn_norm"],
                                     norm_eps=self.eps)
            else:
                x, call_kw = self._input(lay["qkv"], h, inp=prev, residual=self.residual, add_residual=True,
                                     norm_weight=lay["attn_norm"], norm_eps=self.eps)
            qkv = lay["qkv"](x, outs["qkv"].view(1, -1), **call_kw)
            rope_kv_write(qkv, self.q_rot, self.k_cache[i], self.v_cache[i], self.cos, self.sin, pos,
                          self.nh, self.ng)
            decode_attention(self.q_rot, self.k_cache[i], self.v_cache[i], self.attn_out, pos, self.nh, self.ng)
            x, call_kw = self._input(lay["out"], self.nh * self.hd, inp=self.attn_out)
            a = lay["out"](x, outs["out"].view(1, -1), **call_kw)
            x, call_kw = self._input(lay["fc1"], h, inp=a, residual=self.residual, add_residual=True,
                                 norm_weight=lay["ffn_norm"], norm_eps=self.eps)
            f = lay["fc1"](x, outs["fc1"].view(1, -1), **call_kw)
            x, call_kw = self._input(lay["fc2"], self.ffn, inp=f, act=self.act)
            prev = lay["fc2"](x, outs["fc2"].view(1, -1), **call_kw)
        y = self.act_buf[:, :h]
        prologue(prev, y, d=h, residual=self.residual, add_residual=True, norm_weight=self.final_norm,
                 norm_eps=self.eps)
        return F.linear(y, self.lm_head).float()

    def reset(self) -> None:
        self.k_cache.zero_()
        self.v_cache.zero_()
