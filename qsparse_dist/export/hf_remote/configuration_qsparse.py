"""Hugging Face config of an exported qsparse-dist model (remote code, loaded through ``auto_map``).

Field meanings follow ``qsparse_dist.config.schema`` (``ModelConfig`` / ``SparsityConfig``):
``linear_kind`` is one of dense | qsparse | block_qsparse | bitnet | bitnet_qsparse, ``sparsity`` maps
each projection (qkv, out, up, down) to the fraction of input features top-K drops, ``block_size`` is
the N:M block, ``ffn_activation`` is relu2glu | drelu | swiglu on the fused [gate ‖ up] output.
``ternary_packed``: BitNet weights are stored as 2-bit codes + one fp32 scale per tensor.
"""

from transformers import PretrainedConfig


class QSparseConfig(PretrainedConfig):
    model_type = "qsparse"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=None,
        intermediate_size=704,
        max_position_embeddings=256,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        ffn_activation="relu2glu",
        tie_embeddings=False,
        num_experts=0,
        num_experts_per_tok=2,
        moe_intermediate_size=None,
        linear_kind="qsparse",
        sparsity=None,
        block_size=None,
        sparsity_rescale=False,
        ternary_packed=False,
        qkv_bias=False,
        initializer_range=0.02,
        use_cache=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.ffn_activation = ffn_activation
        self.tie_embeddings = tie_embeddings
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.linear_kind = linear_kind
        self.sparsity = dict(sparsity or {"qkv": 0.0, "out": 0.0, "up": 0.0, "down": 0.0})
        self.block_size = block_size
        self.sparsity_rescale = sparsity_rescale
        self.ternary_packed = ternary_packed
        self.qkv_bias = qkv_bias
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # The LM head is computed from the embedding inside the model when tied (no weight tying
        # machinery needed), so transformers must never tie anything itself.
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads
