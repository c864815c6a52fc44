"""Runtime + ``generate``: loading an HF export reproduces the training model's logits; greedy
KV-cache decoding is deterministic, equals a cache-free recomputation and transformers' ``generate``
on the same export; sampling is seeded; the CLI streams text and reports clean errors."""

from __future__ import annotations

import pytest
import torch

from qsparse_dist.export import export_hf, load_checkpoint
from qsparse_dist.infer.generate import TextStream, generate_ids, generate_text, prompt_ids
from qsparse_dist.infer.runtime import InferenceLinear, load_model
from qsparse_dist.infer.sampling import sample_next, top_p_filter
from tests.export_fixtures import make_checkpoint, make_config, reference_model, train_tokenizer

KINDS = {  # name: (sparsity kind, config kwargs, pack ternary)
    "llama": ("dense", {"act": "swiglu"}, False),
    "qsparse": ("qsparse", {}, False),
    "bitnet_qsparse": ("bitnet_qsparse", {}, False),
    "bitnet_qsparse_packed": ("bitnet_qsparse", {"tied": True}, True),
    "mixtral": ("dense", {"act": "swiglu", "moe": True}, False),
    "moe_block_qsparse": ("block_qsparse", {"moe": True}, False),
}
# Packed ternary weights are exactly s·W_q, and the training fake-quant forward returns exactly s·W_q
# too, so the packed case uses the same 5× wider weights as the others.
SCALE: dict[str, float] = {}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(root / "tok")
    out = {}
    for name, (kind, kw, pack) in KINDS.items():
        ckpt = load_checkpoint(make_checkpoint(root / f"ck_{name}", make_config(kind, **kw), tok,
                                                  scale=SCALE.get(name, 5.0)))
        out[name] = (ckpt, export_hf(ckpt, root / f"hf_{name}", pack_ternary=pack).out_dir)
    return out


@pytest.mark.parametrize("name", list(KINDS))
def test_runtime_logits_equal_training_model(name, exports):
    ckpt, path = exports[name]
    lm = load_model(path, device="cpu")
    assert lm.arch == {"llama": "llama", "mixtral": "mixtral"}.get(name, "qsparse")
    assert all(not type(m).__name__ == "SparseLinear" for m in lm.model.modules())
    assert any(isinstance(m, InferenceLinear) for m in lm.model.modules())
    tokens = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = reference_model(ckpt)(tokens)
        got = lm.model(tokens)
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", list(KINDS))
def test_greedy_matches_transformers_generate(name, exports):
    from transformers import AutoModelForCausalLM

    _, path = exports[name]
    lm = load_model(path, device="cpu")
    ids = prompt_ids(lm, "ROMEO: What light")
    assert ids[0] == 2  # exported from training: prompts start at a document boundary (EOS)
    ours = list(generate_ids(lm.model, ids, max_new_tokens=12, temperature=0.0, eos_ids=lm.eos_token_ids))
    again = list(generate_ids(lm.model, ids, max_new_tokens=12, temperature=0.0, eos_ids=lm.eos_token_ids))
    assert ours == again and len(ours) >= 1
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert ours == ref[0, len(ids):].tolist()


def test_kv_cache_decode_equals_full_recompute(exports):
    _, path = exports["moe_block_qsparse"]
    lm = load_model(path, device="cpu")
    ids = prompt_ids(lm, "KING HENRY")
    cached = list(generate_ids(lm.model, ids, max_new_tokens=10, temperature=0.0))
    seq = list(ids)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(lm.model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(ids):]


def test_sampling_is_seeded(exports):
    _, path = exports["qsparse"]
    lm = load_model(path, device="cpu")
    a = generate_text(lm, "To be", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5)
    b = generate_text(lm, "To be", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=5)
    c = generate_text(lm, "To be", max_new_tokens=16, temperature=1.0, top_p=0.9, seed=6)
    assert a.new_ids == b.new_ids and a.text == b.text
    assert a.new_ids != c.new_ids
    assert a.text == lm.tokenizer.decode(a.new_ids, skip_special_tokens=True)


def test_measured_sparsity_of_the_decode(exports):
    _, path = exports["qsparse"]
    lm = load_model(path, device="cpu")
    lm.set_track_sparsity(True)
    generate_text(lm, "Hark", max_new_tokens=8, temperature=0.0)
    stats = lm.measured_sparsity()
    assert stats["qkv"] == pytest.approx(0.5) and stats["out"] == pytest.approx(0.5)
    assert stats["up"] == pytest.approx(0.5) and stats["down"] >= 0.6  # top-K drops 60 % of the down input


def test_top_p_and_greedy():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    assert torch.allclose(top_p_filter(probs, 0.6), torch.tensor([[0.625, 0.375, 0.0]]))
    assert torch.equal(top_p_filter(probs, 0.5), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(probs, 1.0), probs)
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0]])
    assert sample_next(logits).item() == 1  # greedy: ties go to the lowest id
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])  # p = [0.035, 0.696, 0.256, 0.013]
    draws = {int(sample_next(logits, 1.0, 0.5, g)) for _ in range(50)}
    assert draws == {1}  # the nucleus of mass 0.5 is the single most probable token
    draws = {int(sample_next(logits, 1.0, 0.95, g)) for _ in range(200)}
    assert draws == {1, 2}  # mass before the third most probable token is 0.952 >= 0.95: excluded

    with pytest.raises(ValueError, match="--top-p"):
        sample_next(logits, 1.0, 0.0)
    with pytest.raises(ValueError, match="--temperature"):
        sample_next(logits, -1.0)


def test_text_stream_waits_for_whole_utf8_characters(exports):
    _, path = exports["llama"]
    lm = load_model(path, device="cpu")
    ids = lm.tokenizer.encode("ok 😀 done", add_special_tokens=False)
    stream = TextStream(lm.tokenizer)
    chunks = [stream.push(i) for i in ids]
    assert "".join(chunks) + stream.flush() == "ok 😀 done"
    assert all("\ufffd" not in c for c in chunks)


def test_cli_generate(exports, capsys):
    from qsparse_dist.cli import main

    _, path = exports["qsparse"]
    args = ["generate", "--model", str(path), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(args + ["--show-sparsity"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and "decode" in out.err and "measured input sparsity: qkv 0.500" in out.err
    assert main(args) == 0
    assert capsys.readouterr().out == out.out  # greedy: same text again
    assert main(args + ["--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", str(path.parent / "nothing"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_remote_model_batched_left_padding(exports):
    """The exported remote-code model honours attention masks: a left-padded batch decodes like each row alone."""
    from transformers import AutoModelForCausalLM

    _, path = exports["qsparse"]
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    a, b = [2, 50, 60, 70, 80, 90], [2, 33, 44]
    ids = torch.tensor([a, [0] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        both = hf.generate(ids, attention_mask=mask, **kw)[:, 6:]
        alone = [hf.generate(torch.tensor([r]), **kw)[0, len(r):] for r in (a, b)]
    assert both[0].tolist() == alone[0].tolist() and both[1].tolist() == alone[1].tolist()
