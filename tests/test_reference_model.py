"""The single-device reference GPT (``qsparse_dist.model.reference``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qsparse_dist.config.schema import ModelConfig, MoEConfig, SparsityConfig
from qsparse_dist.model import QSparseGPT
from qsparse_dist.model.reference import RMSNorm, apply_rope, rope_cache, switch_aux_loss

V, H, T = 48, 32, 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls: intra-op threads only add sync overhead (10x slower on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(linear="qsparse", moe=None, seed=0, **model_kw) -> QSparseGPT:
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=H, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
              seq_length=16, init_std=0.1, moe=moe)
    kw.update(model_kw)
    sp = dict(linear=linear, qkv=0.5, out=0.5, up=0.5, down=0.5)
    if linear == "block_qsparse":
        sp["block_size"] = 8
    return QSparseGPT(ModelConfig(**kw), SparsityConfig(**sp)).eval()


def tokens(b=2, t=T, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_rmsnorm_hand_case():
    n = RMSNorm(2, eps=0.0)
    assert torch.allclose(n(torch.tensor([[3.0, 4.0]])), torch.tensor([[3.0, 4.0]]) / math.sqrt(12.5))


def test_rope_properties():
    cos, sin = rope_cache(8, 4, 10000.0)
    assert torch.allclose(cos[0], torch.ones(4)) and torch.allclose(sin[0], torch.zeros(4))
    x = torch.randn(1, 2, 8, 4)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[:, :, 0], x[:, :, 0])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)  # a rotation
    # relative: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(4), torch.randn(4)
    qq = apply_rope(q.expand(1, 1, 8, 4), cos, sin)[0, 0]
    kk = apply_rope(k.expand(1, 1, 8, 4), cos, sin)[0, 0]
    assert torch.allclose(qq[3] @ kk[1], qq[6] @ kk[4], atol=1e-5)


@pytest.mark.parametrize("linear", ["dense", "qsparse", "block_qsparse", "bitnet_qsparse"])
def test_causality(linear):
    model = make(linear)
    a = tokens()
    b = a.clone()
    b[:, 7:] = (b[:, 7:] + 5) % V
    with torch.no_grad():
        la, lb = model(a), model(b)
    assert la.shape == (2, T, V)
    assert torch.allclose(la[:, :7], lb[:, :7], atol=1e-6)
    assert not torch.allclose(la[:, 7:], lb[:, 7:], atol=1e-3)


@pytest.mark.parametrize("linear, moe", [("qsparse", None), ("bitnet_qsparse", None),
                                         ("qsparse", MoEConfig(num_experts=4, router_topk=2))])
def test_kv_cache_decode_equals_full_forward(linear, moe):
    model = make(linear, moe=moe, num_query_groups=2)
    x = tokens(t=20)  # runs past seq_length=16: RoPE tables are extended on the fly
    with torch.no_grad():
        full = model(x)
        logits, caches = model(x[:, :5], kv_caches=[])
        steps = [logits]
        for i in range(5, 20):
            logits, caches = model(x[:, i:i + 1], kv_caches=caches, start_pos=i)
            steps.append(logits)
    assert len(caches) == 2 and caches[0][0].shape == (2, 2, 20, H // 4)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # a chunked prefill (several new tokens on top of a cache) also matches
    with torch.no_grad():
        l1, c = model(x[:, :8], kv_caches=[])
        l2, _ = model(x[:, 8:13], kv_caches=c, start_pos=8)
    assert torch.allclose(torch.cat([l1, l2], 1), full[:, :13], atol=1e-5)


@pytest.mark.parametrize("linear", ["dense", "qsparse"])
def test_gqa_equals_mha_with_repeated_kv(linear):
    nh, ng, hd = 4, 2, H // 4
    gqa = make(linear, num_query_groups=ng)
    mha = make(linear, seed=5)
    sd = gqa.state_dict()
    assert sd["layers.0.attn.qkv.weight"].shape == ((nh + 2 * ng) * hd, H)
    for i in range(2):
        w = sd[f"layers.{i}.attn.qkv.weight"]
        q, k, v = w.split([nh * hd, ng * hd, ng * hd])
        rep = lambda t: t.view(ng, hd, H).repeat_interleave(nh // ng, dim=0).reshape(nh * hd, H)  # noqa: E731
        sd[f"layers.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(sd)
    x = tokens()
    with torch.no_grad():
        assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_tied_embeddings():
    tied, untied = make(tie_embeddings=True), make()
    assert tied.lm_head is None and "lm_head.weight" not in tied.state_dict()
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(tied) == V * H
    seen = {}
    tied.final_norm.register_forward_hook(lambda mod, i, o: seen.setdefault("h", o))
    x = tokens()
    with torch.no_grad():
        logits = tied(x)
    assert torch.allclose(logits, seen["h"] @ tied.embed.weight.T, atol=1e-6)
    tied.train()
    tied(x).sum().backward()
    assert tied.embed.weight.grad is not None and tied.embed.weight.grad.abs().sum() > 0


def test_state_dict_layout():
    keys = set(make(moe=MoEConfig(num_experts=2, router_topk=1)).state_dict())
    assert {"embed.weight", "final_norm.weight", "lm_head.weight", "layers.1.attn_norm.weight",
            "layers.1.ffn_norm.weight", "layers.1.attn.qkv.weight", "layers.1.attn.out.weight",
            "layers.1.ffn.router.weight", "layers.1.ffn.experts.1.fc1.weight",
            "layers.1.ffn.experts.1.fc2.weight"} <= keys
    dense = make().state_dict()
    assert dense["layers.0.ffn.fc1.weight"].shape == (128, H) and dense["layers.0.ffn.fc2.weight"].shape == (H, 64)
    assert not any("rope" in k for k in dense)


def test_switch_aux_loss_hand_cases():
    t, e, k = 8, 4, 2
    uniform = torch.full((t, e), 1 / e)
    assert switch_aux_loss(uniform, torch.full((e,), t * k // e), k).item() == pytest.approx(1.0)
    # all traffic on expert 0 with all probability there: E/(T²k)·T·Tk = E
    probs = torch.zeros(t, e)
    probs[:, 0] = 1
    counts = torch.tensor([t * k, 0, 0, 0])
    assert switch_aux_loss(probs, counts, k).item() == pytest.approx(e)


def test_moe_routing_top_k_and_aux_loss():
    model = make(moe=MoEConfig(num_experts=4, router_topk=2, aux_loss_coeff=0.1))
    moe = model.layers[0].ffn
    h = torch.randn(10, H, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = moe(h)
        logits = moe.router(h)
        top_v, top_i = logits.topk(2, dim=-1)
        w = top_v.softmax(-1)
        want = torch.stack([sum(w[t, j] * moe.experts[int(top_i[t, j])](h[t:t + 1])[0] for j in range(2))
                            for t in range(10)])
    assert torch.allclose(out, want, atol=1e-6)
    counts = torch.bincount(top_i.flatten(), minlength=4)
    assert torch.equal(moe.last_tokens_per_expert, counts) and int(counts.sum()) == 20
    p = logits.softmax(-1)
    aux = 4 / (10 * 10 * 2) * (p.sum(0) * counts).sum()
    assert moe.last_aux_loss.item() == pytest.approx(aux.item(), rel=1e-5)
    # the model sums the layers' losses times the coefficient
    with torch.no_grad():
        model(tokens())
    layer_losses = [blk.ffn.last_aux_loss for blk in model.layers]
    assert model.aux_loss().item() == pytest.approx(0.1 * sum(x.item() for x in layer_losses), rel=1e-6)
    assert make().aux_loss() is None


def test_aux_loss_gradient_reaches_router():
    model = make(moe=MoEConfig(num_experts=4, router_topk=2)).train()
    model(tokens())
    model.aux_loss().backward()
    assert model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_sparsity_stats():
    model = make("qsparse")
    model.set_track_sparsity(True)
    with torch.no_grad():
        model(tokens())
    stats = model.sparsity_stats()
    assert sorted(stats) == [f"layers.{i}.{p}" for i in range(2) for p in ("down", "out", "qkv", "up")]
    for i in range(2):
        for p in ("qkv", "out", "up"):
            assert stats[f"layers.{i}.{p}"] == pytest.approx(0.5)
        assert stats[f"layers.{i}.down"] >= 0.5  # relu²GLU adds its own zeros on top of top-K

    moe = make("qsparse", moe=MoEConfig(num_experts=2, router_topk=1))
    moe.set_track_sparsity(True)
    with torch.no_grad():
        moe(tokens())
    assert moe.sparsity_stats()["layers.1.up"] == pytest.approx(0.5)
    moe.set_track_sparsity(False)
    assert not any(getattr(m, "track_sparsity", False) for m in moe.modules())


def test_training_step_reduces_loss():
    model = make("bitnet_qsparse").train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(b=4, t=16)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, V), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_vocab_size_required():
    with pytest.raises(ValueError, match="model.vocab_size must be set"):
        QSparseGPT(ModelConfig(), SparsityConfig())


def test_moe_sparsity_stats_ignore_idle_experts():
    """An expert that received no token in the last forward must not contribute a stale value."""
    model = make("qsparse", moe=MoEConfig(num_experts=2, router_topk=1))
    moe = model.layers[0].ffn
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0], moe.router.weight[1, 1] = 1.0, 1.0  # feature 0 -> expert 0, 1 -> expert 1
    model.set_track_sparsity(True)
    sparse_row = torch.zeros(H)
    sparse_row[1] = 1.0  # routed to expert 1; its fc1 input is 31/32 zeros
    dense_rows = torch.randn(4, H, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    dense_rows[:, 0] += 10.0  # routed to expert 0
    with torch.no_grad():
        moe(torch.cat([dense_rows, sparse_row[None]]))
        assert moe.last_tokens_per_expert.tolist() == [4, 1]
        assert model.sparsity_stats()["layers.0.up"] == pytest.approx((0.5 + 31 / 32) / 2)
        moe(dense_rows)  # expert 1 idle now
    assert moe.last_tokens_per_expert.tolist() == [4, 0]
    assert model.sparsity_stats()["layers.0.up"] == pytest.approx(0.5)
