"""Hugging Face model of an exported qsparse-dist checkpoint (remote code, loaded through ``auto_map``).

Nothing here restates the model: the decoder layers are the shared torch blocks of
``qsparse_dist/model/blocks.py`` (RMSNorm, rotate-half RoPE, GQA attention with fused QKV, fused
[gate ‖ up] GLU, top-k routed MoE) — the very classes the reference model is built from — and the
linear-layer math is ``linear.py``, ``sparsify.py``, ``quant.py``, ``activations.py`` and
``packing.py`` of ``qsparse_dist/ops``.  The export copies those files, unchanged, next to this one;
every import between them is a plain ``from .x import y`` (transformers copies such siblings into its
module cache), so the exported model runs the same top-K / N:M / ternary / int8 code as training.
This file adds only what is HF-specific: the projection module (packed ternary weights), the
attention mask with padding, the ``PreTrainedModel`` plumbing and the cache API.

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
from .blocks import GLUMLP, Attention, DecoderBlock, MoEMLP, RMSNorm, cached_causal_mask, rope_tables
from .configuration_qsparse import QSparseConfig
from .dispatch import triton_kernels_for  # noqa: F401
from .linear import LinearRecipe, qsparse_linear, scale_codes_product
from .packing import unpack_ternary
from .quant import code_dtype, fake_quant_weight_ternary, quantize_activation_int8  # noqa: F401
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
            self._codes = None
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def _ternary_codes(self, dtype):
        w = self._codes
        if w is None or w.device != self.weight_packed.device or w.dtype != dtype:
            w = unpack_ternary(self.weight_packed, self.in_features).to(dtype)
            self._codes = w
        return w

    def forward(self, x):
        if self.packed:  # weight already quantized: linear.py's exact product (X_q·W_qᵀ)·(s_x·s_w)
            x_q, s_x = quantize_activation_int8(self.recipe.sparsify(x))
            dtype = code_dtype(x.dtype)
            y_int = F.linear(x_q.to(dtype), self._ternary_codes(dtype))
            y = scale_codes_product(y_int, s_x, self.weight_scale.float(), x.dtype)
            return y if self.bias is None else y + self.bias
        return qsparse_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self):
        r = self.recipe
        return f"in={self.in_features}, out={self.out_features}, kind={r.kind}, sparsity={r.sparsity}, packed={self.packed}"


def _make_linear(config):
    """The ``make_linear`` factory of ``blocks.py``: a :class:`QSparseLinear` with each projection's recipe."""

    def make(in_features, out_features, projection, bias):
        return QSparseLinear(in_features, out_features, _recipe(config, projection), config.ternary_packed, bias)

    return make


def _decoder_block(config, layer_idx):
    """One decoder layer built from the shared blocks (``attn_norm``, ``attn``, ``ffn_norm``, ``ffn``)."""
    make, act = _make_linear(config), glu_activation(config.ffn_activation)
    h = config.hidden_size
    attn = Attention(h, config.num_attention_heads, config.num_key_value_heads, config.head_dim, make,
                     qkv_bias=config.qkv_bias, layer_idx=layer_idx)
    if config.num_experts:
        ffn = MoEMLP(h, config.moe_intermediate_size or config.intermediate_size, config.num_experts,
                     config.num_experts_per_tok, make, act, track_routing=False)
    else:
        ffn = GLUMLP(h, config.intermediate_size, make, act)
    return DecoderBlock(attn, ffn, h, config.rms_norm_eps)


class QSparsePreTrainedModel(PreTrainedModel):
    config_class = QSparseConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderBlock"]
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
        if isinstance(module, RMSNorm) and not getattr(module.weight, "_is_hf_initialized", False):
            with torch.no_grad():
                module.weight.fill_(1.0)


class QSparseModel(QSparsePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(_decoder_block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
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
            x = layer.forward_hf(x, cos, sin, mask, cache)
        return self.final_norm(x), cache


def _attention_mask(attention_mask, b, t, past, device):
    """``None`` (plain causal, no cache, no padding) or a boolean ``[B, 1, T, past+T]`` mask: query
    ``i`` sees keys ``j <= past + i`` that are not padding; a token always sees itself."""
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    if past == 0 and not padded:
        return None
    mask = cached_causal_mask(t, past + t, device)[None, None].expand(b, 1, t, past + t)
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
