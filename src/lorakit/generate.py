"""Generation with a chat template: batched greedy answers, exact match, streaming chat.

Every function takes a codec (:class:`~lorakit.data.encode.TextCodec` over a tokenizer, or
the image road's over a processor), which turns conversations into the model's inputs; images
travel in the conversations' turns.

What a model was trained with to answer well, its system prompt and chat template, is saved
beside the adapter (:data:`GENERATION_FILE`) and used by ``generate``, ``chat`` and ``eval``
unless overridden: an adapter then answers in the shape it learned without hidden knowledge.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .data import Conversation, Example, check_chat_template, with_system
from .errors import LoraError

if TYPE_CHECKING:
    from .data.encode import TextCodec

GENERATION_FILE = "generation_settings.json"


@dataclass(frozen=True)
class GenerationSettings:
    """How to prompt an adapter: the system prompt and chat template it was trained with.

    Attributes:
        system: put first in every conversation that has no system message; ``None``: none.
        chat_template: Jinja text replacing the tokenizer's template; ``None``: the model's own.
    """

    system: str | None = None
    chat_template: str | None = None

    def messages(self, conversation: Conversation) -> Conversation:
        """``conversation`` as the model saw such conversations in training."""
        return with_system(conversation, self.system)

    def apply_template(self, tokenizer: Any) -> None:
        """Set the chat template on ``tokenizer`` (a copy the caller owns) when one is saved."""
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template

    def template_for(self, model_template: str | None) -> str | None:
        """The chat template a runtime without lorakit (transformers, llama.cpp, vLLM) should
        use to prompt as ``lorakit generate`` does: the saved template, else ``model_template``,
        with the saved system prompt baked in as the default (see :func:`bake_system_prompt`).

        A merged GGUF writes it as ``tokenizer.chat_template``; ``None`` when there is no
        template at all.
        """
        template = self.chat_template or model_template
        return None if template is None else bake_system_prompt(template, self.system)

    def bake_into(self, processor: Any) -> GenerationSettings:
        """Bake these settings into ``processor``'s chat template (and its tokenizer's), for a
        merged folder that answers like the adapter under plain ``from_pretrained``.

        Returns:
            The settings to save beside it: the template as trained, not baked, so that
            ``lorakit generate --system ''`` on the merged folder still means no system prompt.
        """
        self.apply_template(processor)
        trained = self.chat_template or _template_text(processor)
        owners = [processor, getattr(processor, "tokenizer", None)]
        for owner in {id(o): o for o in owners if o is not None}.values():
            template = getattr(owner, "chat_template", None)
            if isinstance(template, str):
                owner.chat_template = bake_system_prompt(template, self.system)
            elif isinstance(template, dict):  # named templates ("default", "tool_use", ...)
                owner.chat_template = {
                    k: bake_system_prompt(v, self.system) for k, v in template.items()
                }
        return GenerationSettings(self.system, trained)


def _template_text(processor: Any) -> str | None:
    """``processor``'s chat template when it is one Jinja text (not named templates)."""
    template = getattr(processor, "chat_template", None)
    return template if isinstance(template, str) else None


def bake_system_prompt(template: str, system: str | None) -> str:
    """``template`` with ``system`` as the system message of every conversation without one.

    A conversation that does not start with a system message gets ``system`` first, as
    :meth:`GenerationSettings.messages` does, so a template's own default (SmolLM2's "You are a
    helpful AI assistant named SmolLM, ...") never shows. Only the first message is checked:
    llama.cpp's Jinja engine knows fewer filters than Jinja2. ``system`` is written as a JSON
    string literal (quotes, backslashes, newlines, ``{{`` and ``%}`` escaped or inert), which
    Jinja2 and llama.cpp both read back exactly. ``system`` ``None`` or empty: ``template``.
    """
    if not system:
        return template
    literal = json.dumps(system, ensure_ascii=False)  # raw UTF-8: no surrogate pairs
    return (
        "{#- lorakit: the system prompt the adapter was trained with, as the default #}"
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        f"{{%- set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}"
        "{%- endif %}" + template
    )


def save_generation_settings(settings: GenerationSettings, folder: str | Path) -> Path:
    """Write ``folder/generation_settings.json`` (temporary name, then renamed)."""
    path = Path(folder) / GENERATION_FILE
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    tmp.replace(path)
    return path


def read_generation_settings(folder: str | Path) -> GenerationSettings:
    """The settings saved in an adapter or model folder; defaults when there are none.

    Raises:
        LoraError: a settings file that is not the JSON object lorakit writes.
    """
    path = Path(folder) / GENERATION_FILE
    if not path.is_file():
        return GenerationSettings()
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
        system, template = (values.get(k) for k in ("system", "chat_template"))
    except (ValueError, AttributeError) as error:  # not UTF-8, not JSON, not an object
        raise LoraError(
            f"{path} is not a JSON object with keys system and chat_template ({error}); fix or "
            "delete it and pass --system / --chat-template instead."
        ) from error
    if not all(isinstance(value, str | None) for value in (system, template)):
        raise LoraError(
            f"{path}: system and chat_template must be strings or null; fix or delete it."
        )
    if template is not None:
        check_chat_template(template, str(path))
    return GenerationSettings(system, template)


def _bar(total: int, desc: str | None, unit: str) -> Any:
    """A progress bar with rate and ETA on stderr; nothing when ``desc`` is ``None``."""
    from .progress import bar

    layout = "{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"
    return bar(total, desc, unit, leave=False, bar_format=layout)


class _TokenProgress:
    """A ``generate(streamer=...)`` hook that moves a bar of replies token by token.

    A batch of ``rows`` replies advances the bar by ``rows / max_new_tokens`` per generated
    token, so the bar moves (with its rate and ETA) while one slow batch runs.
    """

    def __init__(self, bar: Any, rows: int, max_new_tokens: int) -> None:
        self.bar, self.rows, self.step = bar, rows, rows / max_new_tokens
        self.done, self.prompt = 0.0, True

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:  # the first call passes the prompt
            self.prompt = False
        elif self.done + self.step < self.rows:
            self.bar.update(self.step)
            self.done += self.step

    def end(self) -> None:
        self.bar.update(self.rows - self.done)


@torch.no_grad()
def generate_batch(
    model: nn.Module,
    codec: TextCodec,
    conversations: Sequence[Conversation],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: str | None = None,
) -> list[str]:
    """Greedy replies to each conversation (ending with a user turn), in order.

    Prompts are padded on the left (:meth:`TextCodec.prompts`) so every sequence's next token
    sits in the last column. ``progress``: the label of a progress bar (rate, ETA) over the
    replies; ``None``: no bar.
    """
    was_training = model.training
    model.eval()
    tokenizer = codec.tokenizer
    replies: list[str] = []
    bar = _bar(len(conversations), progress, "reply")
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            enc = {k: v.to(model.device) for k, v in codec.prompts(chunk).items()}
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
                streamer=None if bar.disable else _TokenProgress(bar, len(chunk), max_new_tokens),
            )
            # (B, prompt + new) -> the new tokens only
            new = out[:, enc["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        bar.close()
        model.train(was_training)
    return replies


def exact_match(prediction: str, reference: str) -> bool:
    """Whether a prediction equals the reference, ignoring surrounding whitespace.

    When both parse as JSON they are compared as JSON values, so spacing and key order do not
    matter, while types do (``1``, ``1.0`` and ``true`` all differ).
    """
    prediction, reference = prediction.strip(), reference.strip()
    try:
        return _canonical_json(prediction) == _canonical_json(reference)
    except json.JSONDecodeError:
        return prediction == reference


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


def split_references(examples: Sequence[Example]) -> tuple[list[Conversation], list[str]]:
    """Prompts (every turn before the last assistant reply) and the replies to match.

    Raises:
        LoraError: for ``text`` examples, which have no reply to compare with.
    """
    prompts, references = [], []
    for number, example in enumerate(examples, 1):
        if isinstance(example, str):
            raise LoraError(
                "Exact match needs chat, sharegpt or alpaca records ending with the assistant's "
                "reply; text records have no reference answer."
            )
        if example[-1]["role"] != "assistant":
            raise LoraError(
                f"Exact match compares the model's reply with each record's last turn, the "
                f"assistant's; record {number} ends with a {example[-1]['role']} turn. Add the "
                "expected reply to it, or remove it."
            )
        prompts.append(example[:-1])
        references.append(example[-1]["content"])
    return prompts, references


def exact_match_score(
    model: nn.Module,
    codec: TextCodec,
    examples: Sequence[Example],
    batch_size: int = 25,
    progress: str | None = None,
) -> float:
    """Share of examples whose greedy reply equals the reference (see :func:`exact_match`).

    ``max_new_tokens`` is just above the longest reference, so the score costs little more
    than the answers themselves. ``progress`` labels a progress bar (see :func:`generate_batch`).
    """
    prompts, references = split_references(examples)
    replies = generate_batch(
        model, codec, prompts, _longest(codec, references) + 8, batch_size, progress
    )
    hits = sum(exact_match(p, r) for p, r in zip(replies, references, strict=True))
    return hits / len(references)


def json_shape(text: str) -> Any:
    """The structure of a JSON text: objects as their keys with the shapes of their values,
    lists as the set of their items' shapes, other values as their type; ``None`` if ``text``
    is not JSON. ``{"a": [1, 2]}`` and ``{"a": [3]}`` have the same shape."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None

    def shape(v: Any) -> Any:
        if isinstance(v, dict):
            return tuple(sorted((k, shape(x)) for k, x in v.items()))
        if isinstance(v, list):
            return ("list", tuple(sorted({repr(shape(x)) for x in v})))
        return type(v).__name__

    return shape(value)


def shape_matches(
    model: nn.Module,
    codec: TextCodec,
    examples: Sequence[Example],
    settings: GenerationSettings,
    progress: str | None = None,
) -> tuple[int, int]:
    """(replies in the reference's JSON shape, examples), prompting as ``lorakit generate`` does.

    Each example's system messages are dropped and ``settings`` applied, as for a user who
    types only the request: this checks that the saved settings reproduce the trained answers.
    """
    prompts, references = split_references(examples)
    prompts = [settings.messages([m for m in p if m["role"] != "system"]) for p in prompts]
    longest = _longest(codec, references)
    replies = generate_batch(model, codec, prompts, longest + 8, len(prompts), progress)
    hits = sum(
        json_shape(p) is not None and json_shape(p) == json_shape(r)
        for p, r in zip(replies, references, strict=True)
    )
    return hits, len(references)


def _longest(codec: TextCodec, references: Sequence[str]) -> int:
    """Tokens in the longest reference reply."""
    tokenizer = codec.tokenizer
    return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)


def stream_reply(
    model: nn.Module, codec: TextCodec, messages: Conversation, max_new_tokens: int = 256
) -> str:
    """Print the reply to ``messages`` token by token as it is generated; return it."""
    from transformers import TextStreamer

    enc = {k: v.to(model.device) for k, v in codec.prompts([messages]).items()}
    tokenizer = codec.tokenizer
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
