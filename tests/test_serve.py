"""``qsparse-dist serve`` as a real subprocess on a free 127.0.0.1 port, driven by the official
``openai`` client (and raw httpx for malformed bodies).

Truths: ``qsparse-dist generate`` (the CLI, run as a process) and the runtime's single-request decode
(:func:`qsparse_dist.infer.generate.generate_text`) on the same prompt — greedy and seeded sampling
must give the same tokens whether the request decodes alone or in the server's batch; transformers'
chat-template renderer; prometheus_client's text parser for ``/metrics``.
One server for the module (``--max-batch 4`` so that 8 clients also queue).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from qsparse_dist.export import export_hf, load_checkpoint
from qsparse_dist.infer.generate import generate_text
from qsparse_dist.infer.runtime import load_model
from tests.export_fixtures import make_checkpoint, make_config, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = ["ROMEO:", "To be, or not", "KING HENRY:", "First Citizen:\nBefore we proceed", "O", "What light",
           "Hark", "JULIET: Good night"]
MAX_LEN = 64
pytestmark = pytest.mark.timeout(240)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    tok = train_tokenizer(root / "tok")
    ckpt = load_checkpoint(make_checkpoint(root / "ck", make_config("qsparse"), tok, scale=5.0))
    plain = export_hf(ckpt, root / "hf_plain").out_dir
    chat = root / "hf"
    shutil.copytree(plain, chat)
    (chat / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # as a user (or an SFT tokenizer) adds one
    return chat


@pytest.fixture(scope="module")
def lm(export):
    return load_model(export, device="cpu")


class Server:
    def __init__(self, proc: subprocess.Popen, log: Path, url: str) -> None:
        self.proc, self.log, self.url = proc, log, url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for fam in text_string_to_metric_families(httpx.get(self.url + "/metrics").text):
            for s in fam.samples:
                key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
                out[key] = s.value
        return out


CLI_PROMPT, CLI_TOKENS = "ROMEO:", 20


@pytest.fixture(scope="module")
def cli_generate(export):
    """``qsparse-dist generate`` as a process, started before the server so that the two start up together."""
    proc = subprocess.Popen([sys.executable, "-m", "qsparse_dist.cli", "generate", "--model", str(export),
                             "--prompt", CLI_PROMPT, "--max-new-tokens", str(CLI_TOKENS), "--temperature", "0",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=REPO)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(export, cli_generate, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    with open(log, "w") as err:  # --port 0: the OS picks a free port; the server prints the address
        proc = subprocess.Popen([sys.executable, "-m", "qsparse_dist.cli", "serve", "--model", str(export),
                                 "--port", "0", "--device", "cpu", "--max-batch", "4", "--max-len", str(MAX_LEN)],
                                stdout=subprocess.DEVNULL, stderr=err, env=_env(), cwd=REPO)
    url = None
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        text = log.read_text()
        if url is None and " on http://" in text:
            url = text.split(" on http://", 1)[1].split()[0]
            url = "http://" + url
        if url is not None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail(f"server did not come up:\n{log.read_text()}")
    srv = Server(proc, log, url)
    yield srv
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _truth(lm, prompt: str, n: int, **kw):
    """The runtime decoding ``prompt`` alone; also the text it streams chunk by chunk."""
    chunks: list[str] = []
    res = generate_text(lm, prompt, max_new_tokens=n, on_text=chunks.append, **kw)
    return res, "".join(chunks)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == ["hf"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_generate_cli(server, cli_generate, lm):
    prompt = CLI_PROMPT
    out, err = cli_generate.communicate(timeout=120)
    assert cli_generate.returncode == 0, err
    assert "prompt 8 tokens, 20 new" in err
    streamed_by_cli = out.removeprefix(prompt).removesuffix("\n")

    r = server.client.completions.create(model="hf", prompt=prompt, max_tokens=20, temperature=0,
                                         extra_body={"return_token_ids": True})
    want, _ = _truth(lm, prompt, 20, temperature=0.0)
    ch = r.choices[0]
    assert ch.model_extra["token_ids"] == want.new_ids and ch.model_extra["prompt_token_ids"] == want.prompt_ids
    assert ch.text == want.text and ch.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (8, 20, 28)

    chunks = list(server.client.completions.create(model="hf", prompt=prompt, max_tokens=20, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == streamed_by_cli  # the same stream the CLI prints
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20


def test_chat_streaming_and_not(server, lm):
    msgs = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "Who?"}]
    rendered = lm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("assistant:")
    want, want_stream = _truth(lm, rendered, 16, temperature=0.0)
    r = server.client.chat.completions.create(model="hf", messages=msgs, max_tokens=16, temperature=0,
                                              extra_body={"return_token_ids": True})
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.message.content == want.text
    assert ch.model_extra["token_ids"] == want.new_ids and r.usage.prompt_tokens == len(want.prompt_ids)
    chunks = list(server.client.chat.completions.create(model="hf", messages=msgs, max_tokens=16, temperature=0,
                                                        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_stream
    assert chunks[-1].choices[0].finish_reason == "length"


def test_eight_concurrent_clients(server, lm):
    """8 clients, 4 batch slots: every answer equals that prompt decoded alone (greedy; one seeded
    top-p request), and decode steps really ran several rows at once."""
    before = server.metrics()
    jobs = [(p, 6 + 3 * i, {"temperature": 0.0}) for i, p in enumerate(PROMPTS)]
    jobs[5] = (PROMPTS[5], 20, {"temperature": 0.8, "top_p": 0.9, "seed": 7})

    def ask(job):
        p, n, kw = job
        return server.client.completions.create(model="hf", prompt=p, max_tokens=n, extra_body={"return_token_ids": True},
                                                **kw)

    with ThreadPoolExecutor(8) as ex:
        answers = list(ex.map(ask, jobs))
    for (p, n, kw), r in zip(jobs, answers):
        want, _ = _truth(lm, p, n, **kw)
        assert r.choices[0].model_extra["token_ids"] == want.new_ids, p
        assert r.choices[0].text == want.text
    after = server.metrics()
    steps = after["qsparse_decode_steps_total"] - before["qsparse_decode_steps_total"]
    rows = after["qsparse_decode_rows_total"] - before["qsparse_decode_rows_total"]
    assert rows > steps  # mean batch > 1
    assert after["qsparse_requests_running"] == 0 and after["qsparse_requests_waiting"] == 0


def test_stop_string(server, lm):
    for prompt in PROMPTS:  # a prompt whose greedy continuation has an ASCII letter or digit after its start
        want, _ = _truth(lm, prompt, 24, temperature=0.0)
        stops = [c for c in want.text[2:] if c.isascii() and c.isalnum()]
        if stops:
            break
    i = want.text.index(stops[0])
    r = server.client.completions.create(model="hf", prompt=prompt, max_tokens=24, temperature=0,
                                         stop=[stops[0], "zzz"])
    assert r.choices[0].text == want.text[:i] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 24


@pytest.mark.parametrize("stop", ["soft", "t l", "O", "ROMEO: But soft, what light", "zz"])
def test_stop_text_streams_only_what_precedes_the_stop(lm, stop):
    """Streamed pieces never include text that later turns out to start a stop string (it may span
    several tokens); truth: ``str.find`` on the whole text."""
    from qsparse_dist.serve.text import StopText

    text = "ROMEO: But soft, what light"
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert lm.tokenizer.decode(ids) == text
    st = StopText(lm.tokenizer, [stop, "never"])
    out = "".join(st.push(i) for i in ids) + st.flush()
    want = text[:text.find(stop)] if stop in text else text
    assert out == want == st.final and st.stopped == (stop in text)


def test_bad_requests_named_while_serving(server, lm):
    want, _ = _truth(lm, "KING HENRY:", 40, temperature=0.0)
    result = {}

    def good():
        result["r"] = server.client.completions.create(model="hf", prompt="KING HENRY:", max_tokens=40, temperature=0,
                                                        extra_body={"return_token_ids": True})

    t = threading.Thread(target=good)
    t.start()
    url = server.url + "/v1/completions"
    cases = [  # (body, param, words in the message)
        ('{"prompt": "x", "max_tokens": 5', "body", "malformed JSON"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens", "greater than or equal to 0"),
        ({"prompt": "", "max_tokens": 4}, "prompt", "at least 1 character"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "valid number"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"max_tokens": 5}, "prompt", "Field required"),
        ({"prompt": "x", "top_p": 0}, "top_p", "greater than 0"),
        ({"prompt": "x", "n": 2}, "n", "only n = 1"),
        ({"prompt": "x", "seed": 2**64}, "seed", "less than"),
        ({"prompt": ["a", "b"]}, "prompt", "one request per prompt"),
        ({"prompt": [5] * 70, "max_tokens": 1}, "prompt", "--max-len 64"),
        ({"prompt": "x", "max_tokens": 100}, "max_tokens", "exceeds --max-len 64"),
        ({"prompt": [400]}, "prompt", "outside the vocabulary"),
        ({"prompt": "x", "model": "gpt-4"}, "model", "not served here"),
        ([1, 2], "body", "JSON object"),
    ]
    for body, param, words in cases:
        kw = {"content": body} if isinstance(body, str) else {"json": body}
        r = httpx.post(url, headers={"content-type": "application/json"}, timeout=30, **kw)
        assert r.status_code in (400, 404, 422), (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client.chat.completions.create(model="hf", messages=[{"role": "user", "content": "x"}], max_tokens=-3)
    t.join(120)
    assert result["r"].choices[0].model_extra["token_ids"] == want.new_ids


def test_disconnect_frees_the_slot(server):
    before = server.metrics()["qsparse_requests_cancelled_total"]
    body = {"model": "hf", "prompt": "Hark", "max_tokens": 58, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ") and json.loads(first[6:])["choices"]
    deadline = time.time() + 30
    while time.time() < deadline:
        m = server.metrics()
        if m["qsparse_requests_cancelled_total"] > before and m["qsparse_requests_running"] == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the disconnected request kept its slot: {m}")


def test_metrics(server):
    m = server.metrics()
    assert m["qsparse_generation_tokens_total"] > 100
    assert m['qsparse_requests_total{endpoint=/v1/completions,status=200}'] >= 10
    assert m['qsparse_requests_total{endpoint=/v1/completions,status=400}'] >= 10
    assert m["qsparse_time_to_first_token_seconds_count"] >= 10
    assert m["qsparse_time_to_first_token_seconds_bucket{le=+Inf}"] == m["qsparse_time_to_first_token_seconds_count"]
    # the export's recipe: top-K keeps 50 % of the qkv/out/up inputs and 40 % of the down input
    assert m["qsparse_input_sparsity{projection=qkv}"] == pytest.approx(0.5)
    assert m["qsparse_input_sparsity{projection=up}"] == pytest.approx(0.5)
    assert m["qsparse_input_sparsity{projection=down}"] >= 0.6


def test_chat_without_template_is_a_400(export, tmp_path):
    from fastapi.testclient import TestClient

    from qsparse_dist.serve.app import create_app

    plain = export.parent / "hf_plain"
    app = create_app(load_model(plain, device="cpu"), model_name="plain", max_len=MAX_LEN, max_batch=2)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        assert "no chat template" in r.json()["error"]["message"]
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


BATCH_KINDS = {  # name: (sparsity kind, config kwargs, pack ternary) — as in tests/test_generate.py
    "llama": ("dense", {"act": "swiglu"}, False),
    "bitnet_qsparse_packed": ("bitnet_qsparse", {"tied": True}, True),
    "moe_block_qsparse": ("block_qsparse", {"moe": True}, False),
}


@pytest.mark.parametrize("name", list(BATCH_KINDS))
def test_batched_step_equals_single_decode(name, export, tmp_path):
    """The batched step with rows of different lengths joining at different steps gives every row the
    tokens the runtime's single-request decode (``generate_ids``) gives it alone — dense, packed
    BitNet + Q-Sparse with tied embeddings, MoE with Block Q-Sparse."""
    import torch

    from qsparse_dist.infer.generate import generate_ids, prompt_ids
    from qsparse_dist.serve.batch_step import decode_step, prefill, supports_batched_step

    kind, kw, pack = BATCH_KINDS[name]
    tok = export / "tokenizer.model"
    ckpt = load_checkpoint(make_checkpoint(tmp_path / "ck", make_config(kind, **kw), tok, scale=5.0))
    model_lm = load_model(export_hf(ckpt, tmp_path / "hf", pack_ternary=pack).out_dir, device="cpu")
    assert supports_batched_step(model_lm.model)
    n = 10
    prompts = [prompt_ids(model_lm, p) for p in PROMPTS[:4]]
    want = [list(generate_ids(model_lm.model, p, max_new_tokens=n)) for p in prompts]
    got: list[list[int]] = [[] for _ in prompts]
    caches, positions = [None] * len(prompts), [0] * len(prompts)
    with torch.inference_mode():
        for step in range(n + len(prompts)):
            if step < len(prompts):  # row `step` joins now
                logits, caches[step] = prefill(model_lm.model, prompts[step], model_lm.device)
                positions[step] = len(prompts[step])
                got[step].append(int(logits.argmax()))
            rows = [r for r in range(len(prompts)) if caches[r] is not None and len(got[r]) < n]
            if not rows:
                break
            sub = [caches[r] for r in rows]
            logits = decode_step(model_lm.model, [got[r][-1] for r in rows], [positions[r] for r in rows], sub,
                                 model_lm.device)
            for r, c, lg in zip(rows, sub, logits):
                caches[r], positions[r] = c, positions[r] + 1
                got[r].append(int(lg.argmax()))
    assert got == want


def test_bad_model_dir_exits_2(tmp_path, capsys):
    from qsparse_dist.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]


def test_sigterm_exits_cleanly(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert "stopped" in server.log.read_text()
