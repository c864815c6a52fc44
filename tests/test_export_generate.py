"""transformers' ``generate(use_cache=True)`` on every exported kind equals cache-free greedy argmax and
the project's runtime (``qsparse_dist.infer``), on the newest transformers (this environment) and on
the oldest supported one (``constraints/oldest-transformers.txt``, installed with ``pip --target``
into ``.venv/oldest-transformers`` by ``launch/_env.sh``, which exports the folder as
``QSPARSE_OLDEST_TRANSFORMERS``).

Each transformers runs ``tests/workers/hf_generate.py`` in a subprocess, with the old release's folder
first on ``PYTHONPATH``; the worker reports ``transformers.__version__`` so the test knows which one
ran.  Without the old folder the test skips locally and FAILS under ``CI=true``.

Independent truths: the runtime decodes the exported weights with the project's own reference model
and KV cache; the cache-free argmax recomputes the whole sequence for every token (no cache at all).
A left-padded batch (attention mask → position ids and masks, which 4.x and 5.x build differently)
must decode each row as it decodes alone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qsparse_dist.export import export_hf, load_checkpoint
from tests.export_fixtures import make_checkpoint, make_config

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "hf_generate.py"
OLDEST_PINS = REPO / "constraints" / "oldest-transformers.txt"
OLDEST_DIR = Path(os.environ.get("QSPARSE_OLDEST_TRANSFORMERS", REPO / ".venv" / "oldest-transformers"))

KINDS = {  # name: (sparsity kind, make_config kwargs, pack ternary, HF class)
    "dense": ("dense", {"act": "swiglu"}, False, "LlamaForCausalLM"),
    "qsparse": ("qsparse", {}, False, "QSparseForCausalLM"),
    "block_qsparse": ("block_qsparse", {}, False, "QSparseForCausalLM"),
    "bitnet": ("bitnet", {"act": "swiglu"}, False, "QSparseForCausalLM"),
    "bitnet_qsparse": ("bitnet_qsparse", {}, False, "QSparseForCausalLM"),
    "bitnet_qsparse_packed": ("bitnet_qsparse", {"tied": True}, True, "QSparseForCausalLM"),
    "moe_dense": ("dense", {"moe": True, "act": "swiglu"}, False, "MixtralForCausalLM"),
    "moe_qsparse": ("qsparse", {"moe": True, "qkv_bias": True}, False, "QSparseForCausalLM"),
}
PROMPTS = [[5, 17, 40, 99, 123], [250, 3, 77, 8, 61]]  # two rows: the batch dimension of the cache is used
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Tiny exports without a tokenizer (so no EOS: every decode runs ``NEW_TOKENS`` steps) and what the
    project's runtime generates from each."""
    from qsparse_dist.infer.generate import generate_ids
    from qsparse_dist.infer.runtime import load_model

    root = tmp_path_factory.mktemp("hfgen")
    out = {}
    for name, (kind, kw, pack, _) in KINDS.items():
        ckpt = load_checkpoint(make_checkpoint(root / f"ck_{name}", make_config(kind, **kw), None, scale=5.0))
        path = export_hf(ckpt, root / f"hf_{name}", dtype="float32", pack_ternary=pack).out_dir
        lm = load_model(path, device="cpu", load_tokenizer=False)
        runtime = [list(generate_ids(lm.model, p, max_new_tokens=NEW_TOKENS, temperature=0.0)) for p in PROMPTS]
        out[name] = (path, runtime)
    spec = root / "spec.json"
    spec.write_text(json.dumps({"models": {n: str(p) for n, (p, _) in out.items()}, "prompts": PROMPTS,
                                "new_tokens": NEW_TOKENS}))
    return spec, {n: r for n, (_, r) in out.items()}, root


def _run_worker(spec: Path, root: Path, tag: str, pythonpath_first: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_MODULES_CACHE=str(root / f"modules_{tag}"))  # remote code cached per transformers version
    if pythonpath_first is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath_first), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(WORKER), str(spec)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(report: dict, runtime: dict) -> None:
    for name, (_, _, _, cls) in KINDS.items():
        got = report["results"][name]
        assert got["arch"] == cls, name
        assert all(len(row) == NEW_TOKENS for row in got["generate"]), (name, got["generate"])
        assert got["generate"] == got["argmax"], f"{name}: generate(use_cache=True) != cache-free argmax"
        assert got["generate"] == runtime[name], f"{name}: transformers generate != qsparse_dist.infer"
        assert got["padded"] == got["alone"], f"{name}: a left-padded batch decodes differently from its rows"


def oldest_pinned_version() -> str:
    found = re.search(r"^transformers==(\S+)\s*$", OLDEST_PINS.read_text(), flags=re.MULTILINE)
    assert found, f"{OLDEST_PINS}: no transformers==X line"
    return found.group(1)


def test_oldest_pin_is_the_declared_floor():
    """pyproject's ``export`` and ``test`` extras declare exactly the release this module tests as the oldest."""
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("export", "test"):
        assert f"transformers>={oldest_pinned_version()}" in extras[name], name


def test_generate_with_cache_newest_transformers(exports):
    import transformers

    spec, runtime, root = exports
    report = _run_worker(spec, root, "newest", None)
    assert report["transformers"] == transformers.__version__
    _check(report, runtime)


def test_generate_with_cache_oldest_transformers(request):
    want = oldest_pinned_version()
    if not (OLDEST_DIR / "transformers").is_dir():
        msg = (f"oldest supported transformers not installed in {OLDEST_DIR}: run `pip install --no-deps "
               f"--target {OLDEST_DIR} -r {OLDEST_PINS.relative_to(REPO)}`")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(msg)
        pytest.skip(msg)
    spec, runtime, root = request.getfixturevalue("exports")  # built only once the folder is known to exist
    report = _run_worker(spec, root, "oldest", OLDEST_DIR)
    assert report["transformers"] == want, f"{OLDEST_DIR} holds transformers {report['transformers']}, pinned {want}"
    _check(report, runtime)
