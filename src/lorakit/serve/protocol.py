"""OpenAI's request and response shapes: strict request models, replies, chunks and errors.

Requests are validated strictly: a field this server does not know, or one of OpenAI's that
it does not implement (``logprobs``, ``tools``...), is a 400 that names it, never silently
ignored. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# OpenAI fields that change the reply in ways this server does not implement.
UNSUPPORTED = {
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "best_of",
    "echo",
    "suffix",
    "audio",
    "modalities",
    "prediction",
    "reasoning_effort",
    "parallel_tool_calls",
}


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        404: "not_found_error",
        429: "rate_limit_exceeded",
    }

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}`` as OpenAI sends it."""
        kind = self.TYPES.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}`` for a chat template (text parts joined)."""
        content = self.content
        text = content if isinstance(content, str) else "".join(p.text for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class LoadAdapter(_Strict):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadAdapter(_Strict):
    lora_name: str
    lora_int_id: int | None = None


def parse(body: bytes, model: type[BaseModel]) -> Any:
    """The request ``body`` as ``model``; an ``ApiError`` (400) naming every problem."""
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        problems = [_problem(e) for e in error.errors()]
        param = ".".join(str(p) for p in error.errors()[0]["loc"]) or None
        raise ApiError(400, "; ".join(problems), param=param) from None


def _problem(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "json_invalid":
        return f"The body is not valid JSON ({error['ctx'].get('error', error['msg'])})."
    if error["type"] == "extra_forbidden":
        if error["loc"][-1] in UNSUPPORTED:
            return f"{where} is not supported by lorakit serve."
        return f"Unknown field {where!r}."
    if error["type"] == "missing":
        return f"{where} is required."
    return f"{where or 'body'}: {error['msg']}."


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def reply(kind: str, rid: str, model: str, text: str, reason: str, tokens: dict) -> dict:
    """A whole reply: ``kind`` "chat" (chat.completion) or "text" (text_completion)."""
    if kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": reason,
        }
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": tokens,
    }


def chunk(kind: str, rid: str, model: str, text: str | None, reason: str | None = None) -> dict:
    """One streamed piece; ``text=None`` with a ``reason`` is the closing chunk."""
    if kind == "chat":
        delta = {} if text is None else {"content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
