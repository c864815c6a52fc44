"""prepare-data on a directory corpus: ``--glob`` selection (recursive, several patterns), binary and
non-UTF-8 files skipped with a warning, exact duplicates dropped, whole documents in each split, and
the summary — checked against the files written by the test itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qsparse_dist.cli import main as cli_main
from qsparse_dist.data import TokenFile, load_tokenizer
from tests.corpus import corpus_text


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    """A source tree: 40 distinct .py documents (nested), one exact duplicate, a binary .py, a
    Latin-1 .py, an empty .py, a .md and a .txt that only the second glob / no glob selects."""
    root = tmp_path_factory.mktemp("tree") / "src"
    paragraphs = list(dict.fromkeys(p for p in corpus_text().split("\n\n") if len(p.strip()) > 40))
    docs = paragraphs[:40]
    for i, d in enumerate(docs):
        sub = root / "pkg" / ("deep/er" if i % 3 == 0 else "") / f"mod_{i:02d}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(d)
    (root / "pkg" / "copy_of_mod_05.py").write_text(docs[5])
    (root / "pkg" / "compiled.py").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (root / "pkg" / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / "pkg" / "empty.py").write_text("")
    (root / "README.md").write_text(paragraphs[40])
    (root / "notes.txt").write_text(paragraphs[41])
    return root, docs + [paragraphs[40]]


def _run(tree_root: Path, out: Path, *globs: str, extra=()) -> int:
    args = ["prepare-data", "--input", str(tree_root), "--out", str(out), "--vocab-size", "512",
            "--text-unit", "document", "--valid-fraction", "0.2"]
    for g in globs:
        args += ["--glob", g]
    return cli_main([*args, *extra])


def test_glob_corpus_documents_duplicates_and_skips(tree, tmp_path, capsys):
    root, expected = tree
    out = tmp_path / "data"
    assert _run(root, out, "**/*.py", "*.md") == 0
    log = capsys.readouterr()
    text = log.out + log.err
    for name, why in [("compiled.py", "binary"), ("latin1.py", "not UTF-8"), ("empty.py", "empty")]:
        assert f"skipped {root / 'pkg' / name}: {why}" in text, text
    meta = json.loads((out / "meta.json").read_text())
    s = meta["summary"]
    # 40 .py + 1 duplicate + README.md read; the duplicate dropped; notes.txt not matched
    assert (s["documents_read"], s["duplicates_dropped"], s["documents"], s["files_skipped"]) == (42, 1, 41, 3)
    assert s["bytes"] == sum(len(d.encode()) for d in expected)
    tok = load_tokenizer(out)
    got = []
    for split in ("train", "valid"):
        tf = TokenFile(out, split)
        offs = tf.doc_offsets
        got += [tok.decode(tf.tokens[offs[i]:offs[i + 1] - 1].tolist()) for i in range(len(offs) - 1)]
        assert meta["splits"][split]["tokens"] == len(tf.tokens)
    # every split holds whole documents, each distinct document exactly once across the two
    assert sorted(got) == sorted(expected)
    assert meta["splits"]["valid"]["documents"] == round(0.2 * 41)
    assert s["tokens"] == sum(sp["tokens"] for sp in meta["splits"].values())


def test_keep_duplicates_and_bad_glob(tree, tmp_path, capsys):
    root, _ = tree
    out = tmp_path / "keep"
    assert _run(root, out, "**/*.py", extra=["--keep-duplicates"]) == 0
    assert json.loads((out / "meta.json").read_text())["summary"]["documents"] == 41
    capsys.readouterr()
    assert _run(root, tmp_path / "none", "**/*.rs") == 2
    err = capsys.readouterr().err
    assert "matches --glob **/*.rs" in err and "Traceback" not in err
    # every matched file unreadable: a clear error, not an empty dataset
    assert _run(root, tmp_path / "bad", "pkg/compiled.py", "pkg/empty.py") == 2
    assert "every matched file was skipped" in capsys.readouterr().err


def test_without_glob_a_folder_keeps_the_suffix_rule(tree, tmp_path):
    root, _ = tree
    out = tmp_path / "plain"
    # no --glob: only .md/.txt (known text suffixes) are read, as before; .py files are not
    args = ["prepare-data", "--input", str(root), "--out", str(out), "--vocab-size", "512",
            "--text-unit", "document", "--valid-fraction", "0"]
    assert cli_main(args) == 0
    tf = TokenFile(out, "train")
    assert len(np.asarray(tf.doc_offsets)) - 1 == 2
