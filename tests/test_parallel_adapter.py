"""In-process tests (no process group): the reference ↔ megatron state-dict adapter and the
parallel-layout validation that must fail before any work with an error naming the setting."""

from __future__ import annotations

import re

import pytest
import torch

from qsparse_dist.config import ConfigError, config_from_dict
from qsparse_dist.config.schema import ParallelConfig
from qsparse_dist.model.reference import QSparseGPT
from qsparse_dist.model.state_dict_adapter import (
    megatron_to_reference,
    qkv_megatron_to_reference,
    qkv_reference_to_megatron,
    reference_to_megatron,
)


def _cfg(tp=1, pp=1, ep=1, tie=False, moe=False, groups=2, qkv_bias=False, **sp):
    model = {"vocab_size": 64, "hidden_size": 32, "num_layers": 4, "num_attention_heads": 4,
             "num_query_groups": groups, "ffn_hidden_size": 48, "seq_length": 8, "tie_embeddings": tie}
    if qkv_bias:
        model["qkv_bias"] = True
    if moe:
        model["moe"] = {"num_experts": 4, "router_topk": 2}
    return config_from_dict({"model": model, "sparsity": {"linear": "qsparse", **sp},
                             "parallel": {"tp": tp, "pp": pp, "ep": ep}})


def _ref_sd(cfg):
    torch.manual_seed(0)
    return QSparseGPT(cfg.model, cfg.sparsity).state_dict()


def test_qkv_regroup_layout_and_inverse():
    nh, ng, hd = 4, 2, 3
    w = torch.arange((nh + 2 * ng) * hd, dtype=torch.float32).unsqueeze(1)  # row ids
    m = qkv_reference_to_megatron(w, nh, ng, hd).squeeze(1).long().tolist()
    q, k, v = list(range(0, 12)), list(range(12, 18)), list(range(18, 24))
    # group 0: q heads 0,1 | k0 | v0 ; group 1: q heads 2,3 | k1 | v1
    assert m == q[:6] + k[:3] + v[:3] + q[6:] + k[3:] + v[3:]
    assert torch.equal(qkv_megatron_to_reference(qkv_reference_to_megatron(w, nh, ng, hd), nh, ng, hd), w)


def test_fc1_rank_layout():
    cfg = _cfg(tp=2)
    sd = _ref_sd(cfg)
    fc1 = sd["layers.0.ffn.fc1.weight"]  # [2F, H] = [gate ‖ up], F = 48
    r1 = reference_to_megatron(sd, cfg, tp_rank=1, tp_size=2)["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(r1, torch.cat([fc1[24:48], fc1[72:96]]))  # [gate_1 ‖ up_1]


@pytest.mark.parametrize("layout", [
    dict(tp=2), dict(pp=2), dict(tp=2, pp=2), dict(tp=2, tie=True), dict(pp=2, tie=True),
    dict(moe=True, ep=2), dict(moe=True, ep=4, pp=2), dict(tp=2, groups=4), dict(tp=2, qkv_bias=True),
])
def test_split_then_merge_is_identity(layout):
    tp, pp, ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
    cfg = _cfg(**layout)
    sd = _ref_sd(cfg)
    shards = {(t, p, e): reference_to_megatron(sd, cfg, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp,
                                               ep_rank=e, ep_size=ep)
              for t in range(tp) for p in range(pp) for e in range(ep)}
    merged = megatron_to_reference(shards, cfg)
    assert set(merged) == set(sd)
    for k in sd:
        assert torch.equal(merged[k], sd[k]), k
    # stage-local layer numbering and the tied output layer only where megatron has it
    last = shards[(0, pp - 1, 0)]
    assert ("output_layer.weight" in last) == (not cfg.model.tie_embeddings or pp > 1)
    assert f"decoder.layers.{4 // pp - 1}.input_layernorm.weight" in last
    assert f"decoder.layers.{4 // pp}.input_layernorm.weight" not in last


def test_merge_accepts_one_rank_per_distinct_shard():
    """tp=2, ep=2 on 2 ranks: rank 0 = (tp 0, ep 0), rank 1 = (tp 1, ep 1) covers everything."""
    cfg = _cfg(moe=True, ep=2, tp=2)
    sd = _ref_sd(cfg)
    shards = {(r, 0, r): reference_to_megatron(sd, cfg, tp_rank=r, tp_size=2, ep_rank=r, ep_size=2) for r in (0, 1)}
    merged = megatron_to_reference(shards, cfg)
    assert all(torch.equal(merged[k], sd[k]) for k in sd)


@pytest.mark.parametrize("bad, message", [
    ({"model": {"num_attention_heads": 4, "hidden_size": 64}, "parallel": {"tp": 8}},
     "parallel.tp=8 does not divide num_attention_heads=4"),
    ({"model": {"num_layers": 3}, "parallel": {"pp": 2}}, "parallel.pp=2 does not divide num_layers=3"),
    ({"model": {"moe": {"num_experts": 6}}, "parallel": {"ep": 4}},
     "parallel.ep=4 does not divide model.moe.num_experts=6"),
    ({"model": {"hidden_size": 64, "ffn_hidden_size": 96}, "parallel": {"tp": 2},
      "sparsity": {"linear": "block_qsparse", "block_size": 64}},
     "sparsity.block_size=64 does not divide attention output (hidden_size / tp)=32"),
])
def test_invalid_layouts_name_the_setting(bad, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(bad)


def test_world_and_megatron_checks_name_the_setting():
    from qsparse_dist.model.megatron.gpt import validate_megatron_config
    from qsparse_dist.parallel import validate_world

    with pytest.raises(ValueError, match=r"parallel\.tp=2 × parallel\.pp=2"):
        validate_world(ParallelConfig(tp=2, pp=2), world_size=2)
    with pytest.raises(ValueError, match=r"parallel\.ep=4"):
        validate_world(ParallelConfig(ep=4), world_size=2)
    validate_world(ParallelConfig(tp=2, ep=2), world_size=2)  # experts spread over the TP ranks
    cfg = config_from_dict({"model": {"vocab_size": 65}, "parallel": {"tp": 2}})
    with pytest.raises(ValueError, match=r"parallel\.tp=2 does not divide model\.vocab_size=65"):
        validate_megatron_config(cfg)
    cfg = config_from_dict({"model": {"vocab_size": 64, "moe": {"num_experts": 4}}, "parallel": {"tp": 2}})
    with pytest.raises(ValueError, match=r"parallel\.sp"):
        validate_megatron_config(cfg)
