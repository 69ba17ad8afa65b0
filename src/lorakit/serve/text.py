"""From tokens to text as they come: incremental detokenisation and stop strings.

A reply is streamed as pieces whose concatenation is the final text: each piece is what the
decoded text gained since the last one. Two things are held back until the next token says
more: a trailing incomplete UTF-8 character (decoded as U+FFFD), and a tail that could be the
start of a stop string (``stop=["###"]`` and a reply ending in ``"#"``).
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


class TextStream:
    """The text of one reply, token by token, cut at the first stop string.

    Args:
        tokenizer: decodes the generated ids (special tokens skipped, as ``generate`` does).
        stop: strings that end the reply; the text ends just before the first one found.
    """

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""  # the text handed out so far: always a prefix of the final text

    def push(self, token: int) -> tuple[str, bool]:
        """Add one generated token; return (new text to send, whether a stop string ended it)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._advance(text[: max(cut, len(self.sent))]), True
        safe = text.rstrip(REPLACEMENT)
        return self._advance(safe[: len(safe) - self._stop_prefix(safe)]), False

    def flush(self) -> str:
        """The text not yet sent, when the reply ends for another reason (EOS, length)."""
        return self._advance(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        """Send what ``text`` adds to the text already sent (nothing if it is not an extension)."""
        if not text.startswith(self.sent):
            return ""  # a tokenizer that rewrote earlier text: keep what was sent consistent
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
