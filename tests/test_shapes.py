"""The projection table and the parameter / FLOP counts of ``qsparse_dist.config.shapes`` against
independent truths: the parameters of a reference model and of a megatron-core model actually built
from the same config (``sum(p.numel())``, each projection's weight shape), and FLOPs worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from qsparse_dist.config import config_from_dict
from qsparse_dist.config.shapes import (
    FLOPS_PER_TOKEN_FORMULA,
    count_params,
    flops_per_token,
    projection_of_module,
    projection_params,
    projection_table,
)
from tests.dist_utils import torchrun

BASE = {"vocab_size": 50, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4, "ffn_hidden_size": 64,
        "seq_length": 16}
CASES = {
    "mha": {},
    "gqa_bias_tied": {"num_query_groups": 2, "qkv_bias": True, "tie_embeddings": True},
    "moe": {"num_query_groups": 2, "moe": {"num_experts": 4, "router_topk": 2, "ffn_hidden_size": 48}},
    "moe_default_width": {"moe": {"num_experts": 2, "router_topk": 2}},
}


def _cfg(case: str, **sparsity):
    return config_from_dict({"model": {**BASE, **CASES[case]}, "sparsity": {"linear": "qsparse", **sparsity}})


def _check_model(m, shapes: dict[str, list[int]], layout: str, embedding_prefixes: tuple[str, ...]) -> None:
    """``shapes``: parameter name → shape of a built model; checks totals, then every projection weight."""
    total = sum(math.prod(s) for s in shapes.values())
    non_embedding = sum(math.prod(s) for n, s in shapes.items() if not n.startswith(embedding_prefixes))
    assert count_params(m, embeddings=True) == total
    assert count_params(m) == non_embedding
    table = projection_table(m)
    seen = {p: 0 for p in table}
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        proj = projection_of_module(name.removesuffix(".weight"), layout)
        if proj is not None:
            assert tuple(shape) == table[proj].weight_shape, name
            seen[proj] += 1
    assert seen == {p: m.num_layers * t.copies for p, t in table.items()}
    assert projection_params(m) == {p: m.num_layers * t.params_per_layer for p, t in table.items()}


@pytest.mark.parametrize("case", CASES)
def test_counts_and_table_match_the_reference_model(case):
    from qsparse_dist.model.reference import QSparseGPT

    cfg = _cfg(case)
    model = QSparseGPT(cfg.model, cfg.sparsity)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    _check_model(cfg.model, shapes, "reference", ("embed.", "lm_head."))


def test_counts_and_table_match_the_megatron_model(tmp_path):
    raw = {case: {"model": {**BASE, **CASES[case]}, "sparsity": {"linear": "qsparse"}} for case in CASES}
    (built,) = torchrun("shapes_megatron.py", 1, tmp_path, [json.dumps(raw)])
    for case, shapes in built.items():
        _check_model(_cfg(case).model, shapes, "megatron", ("embedding.", "output_layer."))


def test_module_names_map_to_projections():
    assert projection_of_module("layers.3.attn.qkv") == "qkv"
    assert projection_of_module("layers.0.ffn.experts.2.fc2") == "down"
    assert projection_of_module("layers.0.ffn.router") is None
    assert projection_of_module("decoder.layers.1.self_attention.linear_proj", "megatron") == "out"
    assert projection_of_module("decoder.layers.0.mlp.experts.local_experts.1.linear_fc1", "megatron") == "up"
    assert projection_of_module("decoder.layers.0.mlp.linear_fc1") is None  # not a reference name


def test_flops_per_token_by_hand():
    from qsparse_dist.train.metrics import FLOPS_FORMULA
    from qsparse_dist.train.metrics import flops_per_token as run_flops

    # dense GQA: H=32, L=2, n_h=4, n_g=2, d=8, F=64, V=50, S=16
    # per layer: qkv 32·(4+2·2)·8 = 2048, out 32·32 = 1024, FFN 3·32·64 = 6144 → 9216; ×2 + head 32·50
    cfg = _cfg("gqa_bias_tied")
    n_active = 2 * 9216 + 32 * 50
    want = 6 * n_active + 6 * 2 * 16 * (4 * 8)
    assert flops_per_token(cfg.model) == want == 126336
    assert run_flops(cfg) == want
    assert flops_per_token(cfg.model, seq_length=32) == want + 6 * 2 * 16 * 32
    # MoE: router 32·4 = 128 and top-2 experts of width 48: 2·3·32·48 = 9216 → 128 + 9216 per layer
    moe = _cfg("moe").model
    assert flops_per_token(moe) == 6 * (2 * (2048 + 1024 + 128 + 9216) + 32 * 50) + 6 * 2 * 16 * 32 == 164736
    assert FLOPS_FORMULA.startswith(FLOPS_PER_TOKEN_FORMULA + ";")
