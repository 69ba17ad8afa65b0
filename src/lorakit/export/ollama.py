"""``--ollama``: a Modelfile beside the GGUF, so ``ollama create NAME -f FILE`` runs the export
as ``lorakit generate`` prompts it: the model (or base + ADAPTER), the chat template, the
run's system prompt (SYSTEM) and greedy decoding.

Ollama's TEMPLATE is a Go template, not Jinja, so the model's Jinja template is translated by
what it renders, not by parsing it. Rendered with marker contents, a chat template of the
usual shape (ChatML, Llama 3, Gemma, Phi-3, Mistral) is a fixed text around each message::

    head  [system: pre S suf]  user: pre U suf  assistant: gen A suf ... user: pre U suf  gen

(head: what comes before a first user message, e.g. BOS or the template's default system
prompt; gen: the generation prompt, which also opens each assistant message). The pieces are
read from five renderings, and the translation is checked: the Go template's rule, replayed
in Python, must give the Jinja text of conversations with and without a system message, or
the export refuses, naming the template, rather than write a Modelfile that prompts wrongly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraError

SYSTEM, USER1, ASSISTANT, USER2 = "LKSYS7Q", "LKUSR1Q", "LKAST1Q", "LKUSR2Q"


@dataclass(frozen=True)
class Turns:
    """The fixed texts of a chat template around each message (see the module docstring)."""

    head: str
    user: tuple[str, str]
    assistant: tuple[str, str]
    gen: str
    system: tuple[str, str] | None  # None: the template refuses system messages

    def render(self, messages: list[dict[str, str]]) -> str:
        """What the Go template makes of ``messages`` (ending in a user turn)."""
        out = "" if messages[0]["role"] == "system" else self.head
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system" and self.system is not None:
                out += self.system[0] + m["content"] + self.system[1]
            elif m["role"] == "user":
                out += self.user[0] + m["content"] + self.user[1] + (self.gen if last else "")
            elif m["role"] == "assistant":
                out += self.assistant[0] + m["content"] + ("" if last else self.assistant[1])
        return out


def _split(text: str, *markers: str) -> list[str]:
    """``text`` cut at each marker in turn: the texts before, between and after them."""
    parts = []
    for marker in markers:
        before, found, text = text.partition(marker)
        if not found:
            raise ValueError(marker)
        parts.append(before)
    return [*parts, text]


def _strip(text: str, suffix: str = "", prefix: str = "") -> str:
    """``text`` without ``prefix`` and ``suffix``, which it must have."""
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(text)
    return text[len(prefix) : len(text) - len(suffix)]


def read_turns(tokenizer: Any, template: str) -> Turns:
    """The pieces of ``template`` (see the module docstring), checked against its renderings.

    Raises:
        LoraError: a template that is not one fixed text around each message.
    """

    def render(*roles_contents: tuple[str, str], gen: bool = True) -> str:
        messages = [{"role": r, "content": c} for r, c in roles_contents]
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=gen
        )

    u1, a1, u2 = ("user", USER1), ("assistant", ASSISTANT), ("user", USER2)
    try:
        turns = _with_system(_turns(render), render)
        conversations = [[u1], [u1, a1, u2]]
        if turns.system is not None:
            conversations.append([("system", SYSTEM), u1, a1, u2])
        for roles in conversations:
            messages = [{"role": r, "content": c} for r, c in roles]
            if turns.render(messages) != render(*roles):
                raise ValueError(f"{[r for r, _ in roles]} renders otherwise")
    except (ValueError, LoraError) as err:
        raise LoraError(
            "the chat template is not one fixed text around each message, so lorakit cannot "
            f"write it as Ollama's Go TEMPLATE ({err}); write the TEMPLATE line of the "
            "Modelfile by hand (see Ollama's Modelfile docs, TEMPLATE), or export without "
            "--ollama."
        ) from None
    return turns


def _turns(render) -> Turns:
    """The pieces around user and assistant messages, from four renderings."""
    u1, a1, u2 = ("user", USER1), ("assistant", ASSISTANT), ("user", USER2)
    bare = render(u1, gen=False)
    gen = _strip(render(u1), prefix=bare)
    head_pre, user_suffix = _split(bare, USER1)
    assistant_suffix = _split(render(u1, a1, gen=False), ASSISTANT)[1]
    _, after_user, after_assistant, _ = _split(render(u1, a1, u2), USER1, ASSISTANT, USER2)
    user_prefix = _strip(after_assistant, prefix=assistant_suffix)
    assistant = (_strip(after_user, prefix=user_suffix), assistant_suffix)
    head = _strip(head_pre, suffix=user_prefix)
    return Turns(head, (user_prefix, user_suffix), assistant, gen, None)


def _with_system(turns: Turns, render) -> Turns:
    """``turns`` with the system message's pieces, when the template takes one."""
    try:
        text = render(("system", SYSTEM), ("user", USER1))
    except Exception:  # a template that raises on a system message (Gemma 2's)
        return turns
    if SYSTEM not in text:  # one that drops it
        return turns
    before, between, _ = _split(text, SYSTEM, USER1)
    suffix = _strip(between, suffix=turns.user[0])
    return Turns(turns.head, turns.user, turns.assistant, turns.gen, (before, suffix))


def _literal(text: str) -> str:
    """``text`` as literal Go-template text: ``{{`` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(turns: Turns) -> str:
    """Ollama's TEMPLATE for ``turns``: the same text around each of ``.Messages``."""
    user_pre, user_suf = (_literal(t) for t in turns.user)
    prefix, suffix = (_literal(t) for t in turns.assistant)
    head = (
        f'{{{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}}}'
        f"{_literal(turns.head)}{{{{ end }}}}"
        if turns.head
        else ""
    )
    gen = f"{{{{ if $last }}}}{_literal(turns.gen)}{{{{ end }}}}" if turns.gen else ""
    first = '{{ if eq $m.Role "user" }}'
    if turns.system is not None:
        pre, suf = (_literal(t) for t in turns.system)
        first = (
            f'{{{{ if eq $m.Role "system" }}}}{pre}{{{{ $m.Content }}}}{suf}{{{{ else ' + first[3:]
        )
    return (
        f"{head}{{{{ range $i, $m := .Messages }}}}"
        "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        f"{first}{user_pre}{{{{ $m.Content }}}}{user_suf}{gen}"
        f'{{{{ else if eq $m.Role "assistant" }}}}{prefix}{{{{ $m.Content }}}}'
        f"{{{{ if not $last }}}}{suffix}{{{{ end }}}}{{{{ end }}}}{{{{ end }}}}"
    )


def _quoted(text: str, what: str) -> str:
    if '"""' in text:
        raise LoraError(f'the {what} holds """, which ends a Modelfile block; remove it.')
    return f'"""{text}"""'


def modelfile(
    model: str,
    *,
    adapter: str | None = None,
    tokenizer: Any = None,
    template: str | None = None,
    system: str | None = None,
) -> str:
    """The Modelfile's text: FROM ``model`` (a GGUF, or the base for ``adapter``), ADAPTER,
    TEMPLATE from the Jinja ``template``, SYSTEM, a stop at the end of an answer, greedy.

    Raises:
        LoraError: a template Ollama's Go TEMPLATE cannot say (see :func:`read_turns`), or a
            template that refuses system messages when there is a system prompt.
    """
    lines = ["# Ollama Modelfile written by lorakit export: ollama create NAME -f THIS_FILE"]
    lines.append(f"FROM {model}")
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is not None:
        turns = read_turns(tokenizer, template)
        if system and turns.system is None:
            raise LoraError(
                "the chat template refuses system messages, so the run's system prompt cannot "
                "go on a SYSTEM line; retrain with a template that takes one."
            )
        lines.append("TEMPLATE " + _quoted(go_template(turns), "chat template"))
        stop = turns.assistant[1].strip()
        if stop and '"' not in stop and "\n" not in stop:
            lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines.append("SYSTEM " + _quoted(system, "system prompt"))
    lines.append("# greedy decoding, as lorakit generate answers")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` as ``<gguf stem>.Modelfile`` beside the GGUF (temporary name, renamed)."""
    out = Path(gguf_path).with_suffix(".Modelfile")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise LoraError(f"Could not write {out} ({err.strerror or err}).") from err
    return out


def for_export(loaded: Any, gguf_path: str | os.PathLike, merged: bool) -> str:
    """The Modelfile of an export (``folder.ForExport``) written to ``gguf_path``: FROM the
    merged GGUF beside it, or FROM the base (its GGUF where lorakit knows one, else its folder,
    which Ollama imports) with the adapter GGUF as ADAPTER; the template as the run trained
    it, without the system prompt baked in (SYSTEM says it)."""
    from ..models.gguf import gguf_source

    own = getattr(loaded.tokenizer, "chat_template", None)
    template = loaded.settings.chat_template or (own if isinstance(own, str) else None)
    name = f"./{Path(gguf_path).name}"
    common = {"tokenizer": loaded.tokenizer, "template": template, "system": loaded.settings.system}
    if merged:
        return modelfile(name, **common)
    spec = str(getattr(loaded.model, "name_or_path", "") or "")
    base = gguf_source(spec) or Path(spec).resolve()
    return modelfile(str(base), adapter=name, **common)
