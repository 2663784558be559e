"""OpenAI-compatible request bodies, response objects and the error JSON shape."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

    Args:
        status: the HTTP status.
        message: what went wrong, for a person.
        type_: OpenAI's error type (invalid_request_error, authentication_error, ...).
        code: a machine-readable code (model_not_found, rate_limit_exceeded, ...).
        param: the request field at fault, if any.
        headers: extra response headers (Retry-After, WWW-Authenticate).
    """

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *,
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _Body(BaseModel):
    # Extra fields are kept so serve/params.py can refuse each by name (null ones, a client's default, pass).
    model_config = ConfigDict(extra="allow")

# torch.Generator takes a 64-bit seed; OpenAI's own bound is int64.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The largest per-request lora_scale: well past any useful strength, and finite.
MAX_LORA_SCALE = 10.0
# OpenAI's limit on top_logprobs (chat); completions' logprobs gets the same one.
MAX_TOP_LOGPROBS = 20


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaSpec(_Body):
    name: str
    # ``schema`` would shadow a BaseModel attribute, so the field has another name.
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # output always follows the schema here (constrained), so both are honoured
    description: str | None = None


class ResponseFormat(_Body):
    type: str
    json_schema: JsonSchemaSpec | None = None


class _Sampling(_Body):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # Python's json reads NaN and Infinity
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)  # the server's --max-n bounds it from above
    # vLLM's extensions and OpenAI's penalties (OpenAI's and vLLM's bounds).
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100, checked in app.py
    stop_token_ids: list[int] | None = None
    # Per-request adapter strength (llama.cpp's lora scale): multiplies the adapter's delta on this row.
    lora_scale: float = Field(1.0, ge=0.0, le=MAX_LORA_SCALE)
    response_format: ResponseFormat | None = None  # serve/structured.py


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for /v1/completions; 0 only with echo
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    # An enum, not free text: the role is pasted into the chat template, so a free string could forge a turn.
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls (serve/tools.py)
    tool_call_id: str | None = None  # which call a tool turn answers


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDef] | None = None  # serve/tools.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class AdapterBody(_Body):
    name: str
    path: str


class ClassifyBody(_Body):
    model: str | list[str]
    input: str | list[str]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, text: str, finish: str | None, *, chat: bool, chunk: bool,
                      role: bool = False, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A (chat) completion or a streamed chunk of one, with a single choice."""
    if not chat:
        choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    elif chunk:
        delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {"content": text}
        choice = {"index": 0, "delta": delta if (text or role) else {}, "logprobs": logprobs,
                  "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                  "finish_reason": finish}
        obj = "chat.completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stops(stop: str | list[str] | None) -> tuple[str, ...]:
    """The stop strings of a request; OpenAI allows up to 4."""
    found = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(found) > 4:
        raise APIError(400, "stop: at most 4 stop sequences", param="stop")
    return tuple(s for s in found if s)


def chat_text(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template wants them: content parts of type text joined."""
    out = []
    for message in messages:
        content = message.content
        if isinstance(content, list):
            parts = [p.get("text") for p in content if p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise APIError(400, "messages: only text content parts are supported", param="messages")
            content = "".join(parts)  # type: ignore[arg-type]
        out.append({"role": message.role, "content": content or ""})
    return out
