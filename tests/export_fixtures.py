"""Shared by tests/test_export*.py and tests/test_generate*.py: tiny reference checkpoints of every
model kind, built in-process (no downloads), with a SentencePiece tokenizer trained by the project's
own ``train_sentencepiece`` on a slice of the test corpus (``tests/corpus.py``)."""

from __future__ import annotations

from pathlib import Path

import torch

from qsparse_dist.config import config_from_dict
from tests.corpus import corpus_text

SPARSITY = {
    "dense": {"linear": "dense"},
    "qsparse": {"linear": "qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.6},
    "block_qsparse": {"linear": "block_qsparse", "block_size": 8, "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
    "bitnet": {"linear": "bitnet"},
    "bitnet_qsparse": {"linear": "bitnet_qsparse", "qkv": 0.5, "out": 0.5, "up": 0.5, "down": 0.5},
}


def train_tokenizer(out: Path) -> Path:
    from qsparse_dist.data.tokenizer import train_sentencepiece

    text = corpus_text(120_000)
    train_sentencepiece(text.split("\n\n"), 320, out)
    return out / "tokenizer.model"


def make_config(kind: str, *, moe: bool = False, act: str = "relu2glu", hidden: int = 64, ffn: int = 96,
                vocab: int = 320, tied: bool = False, qkv_bias: bool = False, layers: int = 2):
    model = {"vocab_size": vocab, "hidden_size": hidden, "num_layers": layers, "num_attention_heads": 4,
             "num_query_groups": 2, "ffn_hidden_size": ffn, "seq_length": 64, "ffn_activation": act,
             "tie_embeddings": tied, "qkv_bias": qkv_bias}
    if moe:
        model["moe"] = {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": ffn // 2}
    return config_from_dict({"model": model, "sparsity": SPARSITY[kind]})


def make_checkpoint(out: Path, cfg, tokenizer: Path | None, seed: int = 0, scale: float = 1.0) -> Path:
    """A reference checkpoint with random weights (``scale`` widens the init so logits differ visibly)."""
    from qsparse_dist.export import save_reference_checkpoint
    from qsparse_dist.model import QSparseGPT

    torch.manual_seed(seed)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    sd = {k: v * scale if v.dim() > 1 else v for k, v in model.state_dict().items()}
    for k in sd:  # non-trivial norm weights and biases, so a swapped tensor would show
        if k.endswith("norm.weight") or k.endswith(".bias"):
            sd[k] = sd[k] + 0.1 * torch.randn_like(sd[k])
    return save_reference_checkpoint(out, sd, cfg, tokenizer_file=tokenizer)


def reference_model(ckpt):
    from qsparse_dist.model import QSparseGPT

    model = QSparseGPT(ckpt.config.model, ckpt.config.sparsity)
    model.load_state_dict(ckpt.state_dict)
    return model.eval()
