"""prepare-data (datasets + sentencepiece + packing), the token reader and the sampler; bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qsparse_dist.cli import main as cli_main
from qsparse_dist.data import DataError, StepSampler, TokenFile, eval_batches, load_tokenizer, prepare_data
from tests.corpus import write_corpus


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "small.txt", 120_000)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, small_text) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data([str(small_text)], out, vocab_size=320, valid_fraction=0.05, num_proc=2, log=_quiet)
    return out


def test_prepared_layout_eos_and_roundtrip(prepared, small_text):
    meta = json.loads((prepared / "meta.json").read_text())
    assert meta["vocab_size"] == 320 and meta["dtype"] == "uint16" and meta["tokenizer"]["kind"] == "sentencepiece"
    tok = load_tokenizer(prepared)
    tf = TokenFile(prepared, "train", verify_checksum=True)
    offsets = tf.doc_offsets
    assert len(offsets) == meta["splits"]["train"]["documents"] + 1
    # every document ends with EOS and contains no other EOS
    ends = tf.tokens[offsets[1:] - 1]
    assert np.all(ends == tok.eos_id)
    assert int((np.asarray(tf.tokens) == tok.eos_id).sum()) == len(offsets) - 1
    # train + valid documents are exactly the distinct paragraphs of the input (exact duplicates
    # dropped, first kept), each round-tripping
    paragraphs = list(dict.fromkeys(p for p in small_text.read_text().split("\n\n") if p.strip()))
    n_docs = meta["splits"]["train"]["documents"] + meta["splits"]["valid"]["documents"]
    assert n_docs == len(paragraphs)
    first = tok.decode(tf.tokens[offsets[0]:offsets[1] - 1].tolist())
    assert first in paragraphs
    text = "Citizen:\n  héllo ∑ 1234 — 𝔘\n"
    assert tok.decode(tok.encode(text)) == text  # byte fallback + verbatim whitespace


def test_prepare_is_deterministic_and_formats_agree(tmp_path, small_text, prepared):
    again = tmp_path / "again"
    prepare_data([str(small_text)], again, vocab_size=320, valid_fraction=0.05, num_proc=1, log=_quiet)
    a, b = json.loads((prepared / "meta.json").read_text()), json.loads((again / "meta.json").read_text())
    assert a["splits"] == b["splits"] and a["tokenizer"]["sha256"] == b["tokenizer"]["sha256"]
    # jsonl and parquet inputs with the same documents give the same tokens (existing tokenizer)
    docs = list(dict.fromkeys(p for p in small_text.read_text().split("\n\n") if p.strip()))[:200]
    jl = tmp_path / "docs.jsonl"
    jl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    outs = {}
    for name in ("docs.jsonl", "docs.parquet"):
        out = tmp_path / f"out_{name}"
        assert cli_main(["prepare-data", "--input", str(tmp_path / name), "--out", str(out), "--tokenizer",
                         str(prepared / "tokenizer.model"), "--text-field", "body", "--valid-fraction", "0"]) == 0
        outs[name] = TokenFile(out, "train")
    assert np.array_equal(np.asarray(outs["docs.jsonl"].tokens), np.asarray(outs["docs.parquet"].tokens))
    assert outs["docs.jsonl"].meta["splits"]["train"]["documents"] == 200


@pytest.mark.parametrize("case", ["missing", "empty", "binary", "bad_jsonl", "no_field", "bad_parquet",
                                  "offline_hub", "tiny_vocab", "both_tokenizer_args", "whitespace_only"])
def test_bad_inputs_give_named_errors(tmp_path, case, capsys):
    f = tmp_path / "in.txt"
    args = ["--vocab-size", "320"]
    expect = "--input"
    if case == "missing":
        f = tmp_path / "nope.txt"
        expect = "no such file"
    elif case == "empty":
        f.write_text("")
        expect = "empty"
    elif case == "binary":
        f.write_bytes(b"\x00\x01\x02" * 100)
        expect = "binary"
    elif case == "bad_jsonl":
        f = tmp_path / "in.jsonl"
        f.write_text('{"text": "ok"}\n{"text": broken\n')
        expect = "cannot be read as json"
    elif case == "no_field":
        f = tmp_path / "in.jsonl"
        f.write_text('{"body": "hello"}\n')
        expect = "--text-field"
    elif case == "bad_parquet":
        f = tmp_path / "in.parquet"
        f.write_text("not parquet at all")
        expect = "PAR1"
    elif case == "offline_hub":
        f = Path("someuser/some_dataset")
        expect = "hub is disabled"
    elif case == "tiny_vocab":
        f.write_text("hello world\n\nanother doc\n")
        args = ["--vocab-size", "100"]
        expect = "--vocab-size"
    elif case == "both_tokenizer_args":
        f.write_text("x")
        args = ["--vocab-size", "320", "--tokenizer", "x.model"]
        expect = "not allowed with argument"
    elif case == "whitespace_only":
        f.write_text("   \n\n  \n")
        expect = "no non-empty text"
    with pytest.raises(SystemExit) if case == "both_tokenizer_args" else _no_raise():
        rc = cli_main(["prepare-data", "--input", str(f), "--out", str(tmp_path / "out"), *args])
        assert rc == 2
    err = capsys.readouterr().err
    assert expect in err, err
    assert "Traceback" not in err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_truncated_token_file_is_detected(tmp_path, prepared):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    with open(bad / "train.bin", "r+b") as f:
        f.truncate((bad / "train.bin").stat().st_size - 2)
    with pytest.raises(DataError, match=r"data.path=.*train.bin has \d+ bytes"):
        TokenFile(bad, "train")
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="meta.json is corrupt"):
        TokenFile(bad, "train")


def test_sampler_dp_shards_partition_the_global_batch_and_resume():
    n, G, b = 103, 12, 2
    single = StepSampler(n, G, b, 1, 0, seed=5)
    for dp in (2, 3):
        ranks = [StepSampler(n, G, b, dp, r, seed=5) for r in range(dp)]
        for t in (0, 7, 8, 20):  # crosses epoch boundaries (8·12 = 96 < 103 < 108)
            flat_single = sorted(i for mb in single.step(t) for i in mb)
            flat_dp = sorted(i for s in ranks for mb in s.step(t) for i in mb)
            assert flat_single == flat_dp
            assert all(len(mb) == b for s in ranks for mb in s.step(t))
            assert len(ranks[0].step(t)) == G // (b * dp)
    # epochs are permutations; resuming at step t = continuing the stream
    first_epoch = single.positions(0, n)
    assert sorted(first_epoch.tolist()) == list(range(n))
    stream = list(single.micro_batches(0, 10))
    resumed = list(StepSampler(n, G, b, 1, 0, seed=5).micro_batches(4, 10))
    assert stream[4 * single.accum:] == resumed
    assert single.step(0) != StepSampler(n, G, b, 1, 0, seed=6).step(0)
    with pytest.raises(ValueError, match="multiple"):
        StepSampler(n, 10, 4, 1, 0, seed=0)
    ev = [eval_batches(n, 3, 2, 2, r) for r in range(2)]
    assert sorted(i for r in ev for mb in r for i in mb) == list(range(12))
