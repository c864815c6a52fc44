"""Request bodies of the OpenAI-compatible endpoints (pydantic, strict types) and the OpenAI error body.

Fields are validated strictly — ``"max_tokens": "5"`` is a type error, not 5 — and every failure
becomes a 400 whose ``error.param`` names the field (see :func:`validation_error_body`).  Unknown
extra fields are ignored, as OpenAI-compatible servers usually do; known options this server does not
implement (``logprobs``, ``n`` > 1, penalties, several prompts in one request) are refused by name
rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "ApiError",
    "CompletionRequest",
    "ChatCompletionRequest",
    "ChatMessage",
    "error_body",
    "validation_error_body",
]

_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status`` (400 by default)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.type = message, param, status, type_


def error_body(message: str, param: str | None = None, type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def validation_error_body(errors: list[dict[str, Any]]) -> dict:
    """pydantic / FastAPI errors → one OpenAI error naming the (first) offending field.

    ``loc`` is ``("body", field, ...)``; union members appear in it as type names (``"str"``,
    ``"list[int]"``), which are dropped from the field path."""
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx", {}).get("error", "")
        return error_body(f"malformed JSON body: {ctx or first.get('msg')}", "body")
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).isidentifier() or str(part) in _TYPE_TAGS:  # "constrained-str", "list[int]", …
            continue
        else:
            path += ("." if path else "") + str(part)
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return error_body("the request body must be a JSON object", "body")
    field = path or "body"
    return error_body(f"{field}: {first.get('msg')}", field)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=100.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # torch.Generator.manual_seed's range
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    user: str | None = None
    return_token_ids: bool = False  # extension (as in vLLM): add prompt_token_ids / token_ids to the choices
    ignore_eos: bool = False  # extension (as in vLLM): decode max_tokens tokens even past EOS (benchmarks)

    def check_supported(self) -> None:
        """Refuse, by name, the OpenAI options this server does not implement."""
        if self.n != 1:
            raise ApiError("n: only n = 1 is supported (send several requests; the server batches them)", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise ApiError(f"{name}: penalties are not supported (only 0)", name)
        if self.logprobs not in (None, False):
            raise ApiError("logprobs: log-probabilities are not supported", "logprobs")

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is text or token ids (or a one-element list of either)."""

    prompt: NonEmptyStr | TokenIds | Annotated[list[NonEmptyStr], Field(min_length=1)] | \
        Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    echo: bool = False
    suffix: str | None = None

    @property
    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) > 1:
                raise ApiError(f"prompt: {len(p)} prompts in one request are not supported; send one request per "
                               "prompt (the server batches concurrent requests)", "prompt")
            return p[0]
        return p


class ContentPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``; ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not two different values")
            self.max_tokens = self.max_completion_tokens
        return self
