"""OpenAI's request and response shapes: strict request models, replies, chunks and errors.

Requests are validated strictly: a field this server does not know (with the nearest known
name), or one of OpenAI's that it does not implement (``logprobs``, ``tools``...), is a 400
that names it, never silently ignored. Every number is bounded to what the engine computes
finitely: a temperature between 0 and ``MIN_TEMPERATURE`` would scale logits past float32,
so it is refused; a seed must fit ``torch.Generator``. Errors have OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import difflib
import json
import time
import typing
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import brief

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
# Between 0 (greedy) and this, logits / temperature can overflow float32 and the softmax gives
# NaN; from it up, only logits beyond 1e36 could (vLLM clamps at the same value).
MIN_TEMPERATURE = 0.01
SEEDS = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes
MAX_STOP_CHARS = 1000  # each stop string is searched for at every token


class ApiError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error",
        401: "invalid_request_error",  # OpenAI's type for a wrong key (code: invalid_api_key)
        404: "not_found_error",
        413: "invalid_request_error",
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
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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
    stop: (
        Annotated[str, Field(max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=4)]
        | None
    ) = None
    seed: Annotated[int, Field(ge=SEEDS[0], le=SEEDS[1])] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens (benchmarks)

    @field_validator("temperature")
    @classmethod
    def _finite_scale(cls, value: float) -> float:
        if 0 < value < MIN_TEMPERATURE:
            raise ValueError(
                f"must be 0 (greedy) or from {MIN_TEMPERATURE} to 2: dividing the logits by "
                f"{value} can overflow float32; use 0 for the most likely token"
            )
        return value

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# A name is echoed in every 404's list of served names: bounded, so one load cannot bloat them.
MAX_ADAPTER_NAME = 256


class LoadAdapter(_Strict):
    lora_name: Annotated[str, Field(max_length=MAX_ADAPTER_NAME)]
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
        errors = _relevant(error.errors(include_input=False), model)
        problems = [_problem(e) for e in errors]
        raise ApiError(400, "; ".join(problems), param=errors[0]["where"] or None) from None


def _relevant(errors: list[dict[str, Any]], model: type[BaseModel]) -> list[dict[str, Any]]:
    """pydantic's errors, each with ``where`` (its place in the request: no union members'
    tags such as ``list[TextPart]``) and ``known`` (the field names there); for a union
    where one member failed deeper (``stop: [too long]``), without the others' type
    mismatches ("stop: Input should be a valid string")."""
    for error in errors:
        loc = error["loc"]
        extra = error["type"] == "extra_forbidden"
        path, at = _walk(model, loc[:-1] if extra else loc)
        path += loc[-1:] if extra else ()
        error.update(path=path, tagged=len(path) < len(loc), known=list(at.model_fields))
        error["where"] = ".".join(map(str, path))

    def deeper(error: dict[str, Any]) -> bool:
        return any(
            other["tagged"]
            and not other["type"].endswith("_type")
            and other["path"][: len(error["path"])] == error["path"]
            for other in errors
        )

    mismatch = [e["tagged"] and e["type"].endswith("_type") and deeper(e) for e in errors]
    return [e for e, drop in zip(errors, mismatch, strict=True) if not drop]


def _problem(error: dict[str, Any]) -> str:
    where = error["where"]
    if error["type"] == "json_invalid":
        return f"The body is not valid JSON ({error['ctx'].get('error', error['msg'])})."
    if error["type"] == "extra_forbidden":
        name = str(error["loc"][-1])
        if name in UNSUPPORTED:
            return f"{where} is not supported by lorakit serve."
        known = error["known"]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.7)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields: {', '.join(known)}."
        return f"Unknown field {brief(where)}; {hint}"
    if error["type"] == "missing":
        return f"{where} is required."
    return f"{where or 'body'}: {error['msg'].removeprefix('Value error, ')}."


def _walk(model: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel]]:
    """``loc`` without union members' tags, and the request model it ends in."""
    kept, current = [], model
    for part in loc:
        if isinstance(part, int):
            kept.append(part)  # a list index
        elif part in current.model_fields:
            kept.append(part)
            current = _nested(current.model_fields[part].annotation) or current
        # else: a union member's tag ("str", "list[TextPart]"), not a place in the request
    return tuple(kept), current


def _nested(annotation: Any) -> type[BaseModel] | None:
    """The request model inside ``annotation`` (``list[Message]``, ``StreamOptions | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_nested, typing.get_args(annotation))), None)


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
