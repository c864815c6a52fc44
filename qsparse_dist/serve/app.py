"""The FastAPI application: OpenAI-compatible routes over the :class:`.scheduler.BatchScheduler`.

    POST /v1/completions        text (or token-id) prompt → continuation; ``stream: true`` = SSE
    POST /v1/chat/completions   messages rendered with the export's chat template → assistant message
    GET  /v1/models             the one served model
    GET  /health                liveness + queue depth
    GET  /metrics               Prometheus text (:mod:`.metrics`)

Every error is an OpenAI error body ``{"error": {"message", "type", "param", "code"}}`` with
``param`` naming the offending field; the route returns, the server keeps serving.  Prompts are
tokenized exactly as ``qsparse-dist generate`` does (:func:`qsparse_dist.infer.generate.prompt_ids`),
so a greedy request returns the text ``generate`` prints for the same prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..infer.generate import prompt_ids
from ..infer.runtime import LoadedModel
from .metrics import Metrics
from .scheduler import BatchScheduler, GenerationRequest
from .schemas import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error_body,
)
from .text import StopText

__all__ = ["create_app", "chat_prompt_ids"]

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def chat_prompt_ids(lm: LoadedModel, messages: list[dict]) -> list[int]:
    """Render ``messages`` with the tokenizer's chat template (plus the assistant generation prompt)
    and tokenize; a model exported from training gets its document-boundary EOS first, like
    ``prompt_ids`` (the template supplies any BOS text itself)."""
    tok = lm.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ApiError("this model has no chat template (no chat_template in the export's tokenizer_config.json "
                       "or chat_template.jinja); use /v1/completions with a plain prompt", "messages")
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = list(tok.encode(text, add_special_tokens=False))
    if lm.from_training and lm.eos_token_ids:
        ids = [lm.eos_token_ids[0]] + ids
    return ids


class _CountRequests:
    """ASGI middleware: ``qsparse_requests_total{endpoint, status}`` (works with streaming bodies)."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.add_request(path if path in ROUTES else "other", status[0])


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(lm: LoadedModel, *, model_name: str, max_len: int, max_batch: int,
               track_sparsity: bool = True) -> FastAPI:
    """Build the app; the decode worker starts with the app's lifespan and stops with it."""
    if lm.tokenizer is None:
        raise ValueError("the model directory has no tokenizer (tokenizer_config.json); the server needs one")
    lm.set_track_sparsity(track_sparsity)
    metrics = Metrics(lm.measured_sparsity if track_sparsity else None)
    scheduler = BatchScheduler(lm, max_batch=max_batch, metrics=metrics)
    created = int(time.time())
    vocab = lm.model_config.vocab_size

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="qsparse-dist serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return JSONResponse(validation_error_body(list(exc.errors())), status_code=400)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(error_body(exc.message, exc.param, exc.type), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", None, kind),
                            status_code=exc.status_code)

    # ------------------------------------------------------------------ helpers
    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(f"model: {name!r} is not served here; this server serves {model_name!r}", "model", 404,
                           "not_found_error")

    def budget(n_prompt: int, max_tokens: int | None) -> int:
        """``max_tokens`` checked against ``--max-len`` (``None`` = the rest of the context)."""
        if n_prompt >= max_len:
            raise ApiError(f"prompt: {n_prompt} tokens; prompt + max_tokens must fit in --max-len {max_len} tokens",
                           "prompt")
        if max_tokens is None:
            return max_len - n_prompt
        if n_prompt + max_tokens > max_len:
            raise ApiError(f"max_tokens: prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) = "
                           f"{n_prompt + max_tokens} exceeds --max-len {max_len}", "max_tokens")
        return max_tokens

    def submit(ids: list[int], body, max_tokens: int) -> GenerationRequest:
        seed = body.seed if body.seed is not None else secrets.randbits(63)
        req = GenerationRequest(ids, max_tokens, body.temperature, body.top_p, seed, asyncio.get_running_loop(),
                                ignore_eos=body.ignore_eos)
        metrics.add_prompt_tokens(len(ids))
        scheduler.submit(req)
        return req

    async def pieces(req: GenerationRequest, text: StopText) -> AsyncIterator[tuple[str, str | None, int]]:
        """``(new_text, finish_reason or None, tokens so far)`` until the request ends; cancels the
        request when the consumer stops early (client gone) or a stop string matched."""
        n, done = 0, False
        try:
            while True:
                kind, value = await req.events.get()
                if kind == "token":
                    n += 1
                    chunk = text.push(value)
                    if text.stopped:
                        done = True
                        yield chunk, "stop", n
                        return
                    yield chunk, None, n  # chunk may be "" (text held back); the stream decides
                elif kind == "done":
                    done = True
                    yield text.flush(), "stop" if value == "cancelled" else value, n
                    return
                else:
                    done = True
                    raise ApiError(str(value), None, 500, "server_error")
        finally:
            if not done:
                req.cancel()
                scheduler.wake()
            elif text.stopped:
                req.cancel()  # the stop string ended it: free the slot now
                scheduler.wake()

    async def collect(req: GenerationRequest, text: StopText, request: Request) -> tuple[str, str, int]:
        async def watch() -> None:  # a non-streaming client that goes away frees its slot too
            while True:
                await asyncio.sleep(0.2)
                if await request.is_disconnected():
                    req.cancel()
                    scheduler.wake()
                    return

        watcher = asyncio.create_task(watch())
        finish, n = "length", 0
        try:
            async for _, fin, count in pieces(req, text):
                finish, n = fin or finish, count
        finally:
            watcher.cancel()
        return text.final, finish, n

    def with_ids(choice: dict, body, prompt: list[int] | None, new: list[int]) -> dict:
        """``return_token_ids`` extension: the prompt's ids (first chunk / whole answer) and the new ids."""
        if body.return_token_ids:
            if prompt is not None:
                choice["prompt_token_ids"] = prompt
            choice["token_ids"] = list(new)
        return choice

    def usage(n_prompt: int, n_new: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}

    def stream(req: GenerationRequest, text: StopText, n_prompt: int, chunk_of, head: list[dict],
               include_usage: bool, base: dict, every_token: bool) -> StreamingResponse:
        """SSE: a chunk whenever there is new text (``every_token``: after every token, text or not)."""
        async def gen() -> AsyncIterator[str]:
            for h in head:
                yield _sse(h)
            n = sent = 0
            try:
                async for chunk, fin, n in pieces(req, text):
                    if chunk or fin or every_token:
                        yield _sse(chunk_of(chunk, fin, text.ids[sent:n]))
                        sent = n
            except ApiError as e:
                yield _sse(error_body(e.message, e.param, e.type))
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage(n_prompt, n)})
            yield _sse("[DONE]")

        return StreamingResponse(gen(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        ok = scheduler.alive
        return JSONResponse({"status": "ok" if ok else "decode worker stopped", "model": model_name,
                             "running": metrics.running, "waiting": metrics.waiting}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "qsparse-dist", "max_model_len": max_len}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported()
        check_model(body.model)
        if body.suffix is not None:
            raise ApiError("suffix: insertion (suffix) is not supported", "suffix")
        p = body.single_prompt
        if isinstance(p, str):
            ids, prompt_text = prompt_ids(lm, p), p
        else:
            bad = [t for t in p if t >= vocab]
            if bad:
                raise ApiError(f"prompt: token id {bad[0]} is outside the vocabulary (size {vocab})", "prompt")
            ids, prompt_text = list(p), lm.tokenizer.decode(p, skip_special_tokens=True)
        max_tokens = budget(len(ids), body.max_tokens)
        req = submit(ids, body, max_tokens)
        text = StopText(lm.tokenizer, body.stop_list)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        echo = prompt_text if body.echo else ""
        if body.stream:
            def chunk_of(chunk: str, fin: str | None, new_ids: list[int]) -> dict:
                choice = {"index": 0, "text": chunk, "logprobs": None, "finish_reason": fin}
                return {**base, "choices": [with_ids(choice, body, None, new_ids)]}

            head = [{**base, "choices": [with_ids({"index": 0, "text": echo, "logprobs": None, "finish_reason": None},
                                                  body, ids, [])]}] if echo or body.return_token_ids else []
            return stream(req, text, len(ids), chunk_of, head, body.include_usage, base, body.return_token_ids)
        out, finish, n = await collect(req, text, request)
        choice = {"index": 0, "text": echo + out, "logprobs": None, "finish_reason": finish}
        return {**base, "choices": [with_ids(choice, body, ids, text.ids[:n])], "usage": usage(len(ids), n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.check_supported()
        check_model(body.model)
        if body.tools:
            raise ApiError("tools: tool calls are not supported", "tools")
        ids = chat_prompt_ids(lm, [{"role": m.role, "content": m.text()} for m in body.messages])
        max_tokens = budget(len(ids), body.max_tokens)
        req = submit(ids, body, max_tokens)
        text = StopText(lm.tokenizer, body.stop_list)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name}
        if body.stream:
            def chunk_of(chunk: str, fin: str | None, new_ids: list[int]) -> dict:
                delta = {"content": chunk} if chunk else {}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": fin}
                return {**base, "choices": [with_ids(choice, body, None, new_ids)]}

            head = [{**base, "choices": [with_ids({"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}, body, ids, [])]}]
            return stream(req, text, len(ids), chunk_of, head, body.include_usage, base, body.return_token_ids)
        out, finish, n = await collect(req, text, request)
        return {**base, "object": "chat.completion",
                "choices": [with_ids({"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None,
                                      "finish_reason": finish}, body, ids, text.ids[:n])],
                "usage": usage(len(ids), n)}

    return app
