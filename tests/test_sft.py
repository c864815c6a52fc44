"""SFT data: chat-template rendering with loss only on assistant turns, prompt tokens contributing
no loss (numerically), packing without cross-example attention leakage, files, and clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "workers"))
from import_hf_tiny import VOCAB, build_hf_model, build_tiny_tokenizer  # noqa: E402

from qsparse_dist.data.sft import (  # noqa: E402
    SFTDataset,
    SFTExample,
    SFTFormatError,
    is_sft_dir,
    masked_lm_loss,
    pack_examples,
    packed_attention_mask,
    prepare_sft,
    read_sft_jsonl,
    tokenize_record,
)
from tests.corpus import write_corpus  # noqa: E402

CHAT = {"messages": [
    {"role": "system", "content": "Speak as a player."},
    {"role": "user", "content": "Who goes there?"},
    {"role": "assistant", "content": "A friend to this ground."},
    {"role": "user", "content": "Stand and unfold yourself."},
    {"role": "assistant", "content": "Long live the king!"},
]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), corpus)


def _trained_text(tok, ex: SFTExample) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, t in zip(ex.ids, ex.trained):
        if t:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_chat_template_trains_only_assistant_turns(tok):
    ex = tokenize_record(tok, CHAT)
    assert tok.decode(ex.ids) == tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert _trained_text(tok, ex) == ["A friend to this ground.<|im_end|>\n", "Long live the king!<|im_end|>\n"]
    pr = tokenize_record(tok, {"prompt": "Who goes there?", "response": "A friend."})
    assert _trained_text(tok, pr) == ["A friend.<|im_end|>\n"]
    assert tok.decode(pr.ids).startswith("<|im_start|>user\nWho goes there?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_response_without_template(tok):
    import copy

    tok = copy.deepcopy(tok)  # the module fixture keeps its template
    tok.chat_template = None
    ex = tokenize_record(tok, {"prompt": "Who goes there?", "response": "A friend."})
    p = tok.encode("Who goes there?", add_special_tokens=False)
    r = tok.encode("A friend.", add_special_tokens=False)
    assert ex.ids == [tok.bos_token_id, *p, *r, tok.eos_token_id]
    assert ex.trained == [False] * (1 + len(p)) + [True] * (len(r) + 1)
    chat = tokenize_record(tok, CHAT)
    assert _trained_text(tok, chat) == ["A friend to this ground.", "Long live the king!</s>"]


def test_packing_rows_and_truncation():
    exs = [SFTExample(list(range(10, 16)), [False, False, False, True, True, True]),   # 5 positions
           SFTExample([20, 21, 22, 23], [False, True, True, True]),                     # 3 positions
           SFTExample([30, 31, 32], [False, False, False]),                              # no trained token
           SFTExample(list(range(40, 52)), [False] * 2 + [True] * 10)]                  # 11 → truncated to 8
    arr, st = pack_examples(exs, seq_length=8, pad_id=0)
    assert st == {"examples": 3, "truncated": 1, "dropped": 1, "trained_tokens": 3 + 3 + 7, "rows": 2}
    assert arr["tokens"][0].tolist() == [10, 11, 12, 13, 14, 20, 21, 22]
    assert arr["labels"][0].tolist() == [11, 12, 13, 14, 15, 21, 22, 23]
    assert arr["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert arr["doc_ids"][0].tolist() == [0] * 5 + [1] * 3
    assert arr["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert arr["loss_mask"][1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    unpacked, st2 = pack_examples(exs, seq_length=8, pad_id=0, pack=False)
    assert st2["rows"] == 3 and unpacked["doc_ids"][1].tolist() == [0, 0, 0, -1, -1, -1, -1, -1]
    assert unpacked["loss_mask"][1, 3:].sum() == 0
    m = packed_attention_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0]
    allowed = (~m).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_prompt_tokens_contribute_no_loss(tok, tmp_path):
    """Numerically: the loss equals the mean CE over response positions only; its gradient w.r.t. the
    logits is exactly zero at prompt positions; and rewriting the prompt positions' labels changes
    nothing (bitwise)."""
    from qsparse_dist.convert import load_imported
    from qsparse_dist.model.reference import QSparseGPT

    build_hf_model("llama", tmp_path / "hf")
    from qsparse_dist.convert import import_hf

    import_hf(tmp_path / "hf", tmp_path / "imp", overrides=["sparsity.linear=qsparse"])
    cfg, sd = load_imported(tmp_path / "imp")
    model = QSparseGPT(cfg.model, cfg.sparsity)
    model.load_state_dict(dict(sd))
    arr, _ = pack_examples([tokenize_record(tok, CHAT), tokenize_record(tok, {"prompt": "Hail!", "response": "Hail."})],
                           seq_length=96, pad_id=tok.pad_token_id)
    tokens, labels = torch.from_numpy(arr["tokens"]).long(), torch.from_numpy(arr["labels"]).long()
    mask = torch.from_numpy(arr["loss_mask"]).float()
    assert 0 < mask.sum() < (arr["doc_ids"] >= 0).sum()
    logits = model(tokens, ).detach().requires_grad_(True)
    loss = masked_lm_loss(logits, labels, mask)
    loss.backward()
    sel = mask.bool()
    manual = torch.nn.functional.cross_entropy(logits.detach()[sel], labels[sel])
    torch.testing.assert_close(loss.detach(), manual, rtol=1e-6, atol=0)
    assert logits.grad[~sel].abs().max().item() == 0.0
    assert logits.grad[sel].abs().sum(-1).min().item() > 0
    scrambled = labels.clone()
    scrambled[~sel] = torch.randint(0, VOCAB, (int((~sel).sum()),))
    assert torch.equal(masked_lm_loss(logits.detach(), scrambled, mask), loss.detach())


def test_packed_rows_do_not_attend_across_examples(tok, tmp_path):
    """transformers' Llama with the block-diagonal causal mask as a 4-D mask: each example's logits
    inside a packed row equal its logits alone (and differ without the mask) — the mask is right.
    Positions are *not* reset here (megatron's RoPE uses row positions): RoPE is relative, so the
    result is unchanged."""
    hf = build_hf_model("llama", tmp_path / "hf")
    hf.config._attn_implementation = "eager"
    exs = [tokenize_record(tok, {"prompt": p, "response": r})
           for p, r in (("Who goes there?", "A friend."), ("Hail!", "Hail, lord."), ("Speak.", "I will."))]
    arr, st = pack_examples(exs, seq_length=128, pad_id=tok.pad_token_id)
    assert st["rows"] == 1 and st["examples"] == 3
    doc = torch.from_numpy(arr["doc_ids"]).long()
    row = torch.from_numpy(arr["tokens"]).long()
    additive = torch.zeros(doc.shape[0], 1, 128, 128).masked_fill(packed_attention_mask(doc), float("-inf"))
    with torch.no_grad():
        packed = hf(row, attention_mask=additive).logits[0]
        leaky = hf(row).logits[0]
        for k, ex in enumerate(exs):
            sel = (doc[0] == k)
            alone = hf(torch.tensor([ex.ids[:-1]])).logits[0]
            assert (packed[sel] - alone).abs().max().item() <= 1e-4
            if k > 0:
                assert (leaky[sel] - alone).abs().max().item() > 1e-2


def test_prepare_files_and_dataset(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    recs = [CHAT, {"prompt": "Hail!", "response": "Hail."}] * 5
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    tok_dir = tmp_path / "tokdir"
    tok.save_pretrained(tok_dir)
    meta = prepare_sft([data], str(tok_dir), tmp_path / "sft", seq_length=64, valid_fraction=0.2)
    assert is_sft_dir(tmp_path / "sft") and not is_sft_dir(tmp_path)
    assert meta["splits"]["train"]["examples"] == 8 and meta["splits"]["valid"]["examples"] == 2
    assert meta["chat_template"] and meta["vocab_size"] == VOCAB
    ds = SFTDataset(tmp_path / "sft")
    row = ds[0]
    assert set(row) == {"tokens", "labels", "loss_mask", "doc_ids", "position_ids", "attention_mask"}
    assert row["tokens"].shape == (64,) and row["attention_mask"].shape == (1, 64, 64)
    assert row["loss_mask"].dtype == torch.float32 and row["loss_mask"].sum() > 0
    assert len(SFTDataset(tmp_path / "sft", "valid", with_attention_mask=False)) >= 1
    saved = np.load(tmp_path / "sft" / "train_tokens.npy")
    assert saved.shape == (len(ds), 64)


def test_bad_records_are_named(tmp_path):
    cases = {
        '{"prompt": "a"}': r"bad.jsonl:1: field 'response' must be a string",
        '{"text": "a"}': r"bad.jsonl:1: a record needs 'prompt'\+'response' or 'messages'",
        '{"messages": [{"role": "user", "content": "x"}]}': "no assistant turn",
        '{"messages": [{"role": "bot", "content": "x"}]}': r"messages\[0\].role='bot'",
        '[1, 2]': "expected a JSON object",
        '{"prompt": "a", ': "bad.jsonl:1: invalid JSON",
    }
    for line, match in cases.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(SFTFormatError, match=match):
            list(read_sft_jsonl(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SFTFormatError, match="no records"):
        list(read_sft_jsonl(tmp_path / "empty.jsonl"))
    with pytest.raises(SFTFormatError, match="not an SFT directory"):
        SFTDataset(tmp_path)
