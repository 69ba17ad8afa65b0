"""Chat templates from files, checked to compile before any model loads."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraError


def read_chat_template(path: str | Path, flag: str = "--chat-template") -> str:
    """The Jinja chat template in file ``path``, checked to compile (before any model loads).

    Raises:
        LoraError: a missing, unreadable or non-UTF-8 file, or a template that does not
            compile (see :func:`check_chat_template`), naming ``flag`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"{flag} {path}: file not found; pass a Jinja file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoraError(
            f"{flag} {path}: not UTF-8 text (byte {error.start + 1}: {error.reason}). Save the "
            "template as UTF-8."
        ) from error
    except OSError as error:
        raise LoraError(f"{flag} {path}: cannot read it ({error.strerror}).") from error
    check_chat_template(text, f"{flag} {path}")
    return text


def check_chat_template(template: str, source: str) -> None:
    """Refuse a chat template that does not compile, naming ``source`` and the template line.

    Compiled as transformers compiles it (its Jinja environment and extensions), so what
    passes here renders later.
    """
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as error:
        raise LoraError(
            f"{source}: the chat template does not compile (template line {error.lineno}: "
            f"{error.message}). Fix the template."
        ) from error
