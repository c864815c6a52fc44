"""Hugging Face model of an exported qsparse-dist checkpoint (remote code, loaded through ``auto_map``).

The architecture is the reference GPT of ``qsparse_dist/model/reference.py`` (RMSNorm, rotate-half
RoPE, GQA, fused QKV and fused [gate ‖ up] fc1, optional top-k routed MoE), and the linear-layer math
is **not re-implemented here**: ``linear.py``, ``sparsify.py``, ``quant.py``, ``activations.py`` and
``packing.py`` next to this file are verbatim copies of ``qsparse_dist/ops`` made at export time, so
the exported model runs the same top-K / N:M / ternary / int8 code as training.

Parameter names are the reference layout under ``model.`` (``model.layers.0.attn.qkv.weight``, …) plus
``lm_head.weight`` (absent when the embeddings are tied).  With ``config.ternary_packed`` a BitNet
projection stores ``weight_packed`` (uint8, 2 bits per weight, see ``packing.py``) and ``weight_scale``
(fp32) instead of the latent ``weight``; the de-quantized ``scale · W_q`` equals what training's
fake-quant produces, so the result is the same.

KV cache: current transformers (5.24) passes the cache to ``forward`` as ``cache=`` and reads it back
from the output's ``cache`` field; older releases (4.46 …) use ``past_key_values`` for both.
``forward`` accepts either name and returns the cache under the field the installed
``CausalLMOutputWithPast`` declares, so ``generate`` (whose generic ``prepare_inputs_for_generation``
slices the prompt to the uncached tokens) works on both.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# dispatch/quant/sparsify are imported by linear.py only; they are named here too because transformers
# 4.46 copies into its module cache just the relative imports of *this* file, not theirs.
from .activations import glu_activation
from .configuration_qsparse import QSparseConfig
from .dispatch import triton_kernels_for  # noqa: F401
from .linear import LinearRecipe, qsparse_linear
from .packing import unpack_ternary
from .quant import fake_quant_weight_ternary  # noqa: F401
from .sparsify import topk_sparsify  # noqa: F401

# The output field that carries the cache: ``cache`` in current transformers, ``past_key_values`` before.
CACHE_OUTPUT_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _recipe(config, projection):
    return LinearRecipe(
        kind=config.linear_kind,
        sparsity=float(config.sparsity.get(projection, 0.0)),
        block_size=config.block_size,
        rescale=config.sparsity_rescale,
    )


class QSparseLinear(nn.Module):
    """``y = prepare_input(x) · weight(W)ᵀ (+ b)`` with the recipe of ``linear.py``."""

    def __init__(self, in_features, out_features, recipe, packed=False, bias=False):
        super().__init__()
        self.in_features, self.out_features, self.recipe = in_features, out_features, recipe
        self.packed = packed and recipe.quantized
        if self.packed:
            self.register_buffer("weight_packed", torch.zeros(out_features, (in_features + 3) // 4, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones((), dtype=torch.float32))
            self._dequantized = None
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _ternary_weight(self, dtype):
        w = self._dequantized
        if w is None or w.device != self.weight_packed.device or w.dtype != dtype:
            w_q = unpack_ternary(self.weight_packed, self.in_features)
            w = (w_q.float() * self.weight_scale.float()).to(dtype)
            self._dequantized = w
        return w

    def forward(self, x):
        if self.packed:  # weight already quantized: only the input side of the recipe remains
            return F.linear(self.recipe.prepare_input(x), self._ternary_weight(x.dtype), self.bias)
        return qsparse_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self):
        r = self.recipe
        return f"in={self.in_features}, out={self.out_features}, kind={r.kind}, sparsity={r.sparsity}, packed={self.packed}"


class QSparseRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(position_ids, head_dim, theta):
    """cos/sin ``[B, 1, S, hd]`` for rotate-half RoPE at integer positions ``[B, S]``."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rot.float() * sin).to(x.dtype)


class QSparseAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.ng, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h, packed = config.hidden_size, config.ternary_packed
        self.qkv = QSparseLinear(h, (self.nh + 2 * self.ng) * self.hd, _recipe(config, "qkv"), packed, config.qkv_bias)
        self.out = QSparseLinear(self.nh * self.hd, h, _recipe(config, "out"), packed)

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.nh * self.hd, self.ng * self.hd, self.ng * self.hd], dim=-1)
        q = q.view(b, t, self.nh, self.hd).transpose(1, 2)
        k = k.view(b, t, self.ng, self.hd).transpose(1, 2)
        v = v.view(b, t, self.ng, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.ng != self.nh:
            rep = self.nh // self.ng
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class QSparseGLU(nn.Module):
    def __init__(self, config, ffn_size):
        super().__init__()
        h, packed = config.hidden_size, config.ternary_packed
        self.fc1 = QSparseLinear(h, 2 * ffn_size, _recipe(config, "up"), packed)
        self.fc2 = QSparseLinear(ffn_size, h, _recipe(config, "down"), packed)
        self.act = glu_activation(config.ffn_activation)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class QSparseMoE(nn.Module):
    """Top-k routing as megatron-core: top-k of the router logits, softmax over the selected k."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.topk = config.num_experts, config.num_experts_per_tok
        ffn = config.moe_intermediate_size or config.intermediate_size
        self.router = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(QSparseGLU(config, ffn) for _ in range(self.num_experts))

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        logits = self.router(h).float()
        top_logits, top_idx = logits.topk(self.topk, dim=-1)
        weights = top_logits.softmax(dim=-1).to(x.dtype)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(h[rows]) * weights[rows, slot, None])
        return out.view(shape)


class QSparseBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn_norm = QSparseRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = QSparseAttention(config, layer_idx)
        self.ffn_norm = QSparseRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = QSparseMoE(config) if config.num_experts else QSparseGLU(config, config.intermediate_size)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.ffn(self.ffn_norm(x))


class QSparsePreTrainedModel(PreTrainedModel):
    config_class = QSparseConfig
    base_model_prefix = "model"
    _no_split_modules = ["QSparseBlock"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True  # transformers 4.46: generate() builds a DynamicCache and passes cache_position
    _supports_static_cache = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, QSparseLinear, nn.Embedding)) and getattr(module, "weight", None) is not None:
            if not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight.normal_(0.0, std)
        if isinstance(module, QSparseLinear) and module.bias is not None and not getattr(module.bias, "_is_hf_initialized", False):
            with torch.no_grad():
                module.bias.zero_()
        if isinstance(module, QSparseRMSNorm) and not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight.fill_(1.0)


class QSparseModel(QSparsePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(QSparseBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = QSparseRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        """Final hidden states and the cache (``cache`` extended by these tokens; a new ``DynamicCache``
        when ``use_cache`` and none was given; ``None`` otherwise)."""
        x = self.embed(input_ids)
        b, t = input_ids.shape
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=x.device).unsqueeze(0).expand(b, t)
        cos, sin = rope_tables(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = _attention_mask(attention_mask, b, t, past, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.final_norm(x), cache


def _attention_mask(attention_mask, b, t, past, device):
    """``None`` (plain causal, no cache, no padding) or a boolean ``[B, 1, T, past+T]`` mask: query
    ``i`` sees keys ``j <= past + i`` that are not padding; a token always sees itself."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if past == 0 and not padded:
        return None
    mask = torch.ones(t, past + t, dtype=torch.bool, device=device).tril(past)[None, None].expand(b, 1, t, past + t)
    if padded:
        keep = attention_mask.bool()[:, None, None, -(past + t):]
        diag = torch.zeros(t, past + t, dtype=torch.bool, device=device)
        diag[torch.arange(t), past + torch.arange(t)] = True
        mask = (mask & keep) | diag
    return mask


class QSparseForCausalLM(QSparsePreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = QSparseModel(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        return_dict=None,
        **kwargs,
    ):
        """``cache`` (current transformers) and ``past_key_values`` (older) are two names for the same KV
        cache; give at most one.  Extra generation kwargs (``cache_position``, …) are ignored: positions
        come from ``position_ids`` or the cache length."""
        if cache is not None and past_key_values is not None:
            raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError("the KV cache must be a transformers Cache (e.g. DynamicCache), not a tuple")
        h, cache = self.model(input_ids, attention_mask, position_ids, cache, use_cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        w = self.model.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, w)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_OUTPUT_FIELD: cache if use_cache else None})
