"""The exception type every user-facing error in lorakit derives from, and how its messages
show values."""

import reprlib
from typing import Any


class LoraError(ValueError):
    """Bad input to lorakit: the message names the problem and how to fix it.

    Subclasses ``ValueError`` so code that already guards against bad values keeps working.
    """


# Few items, shallow, short strings: the work and the text stay bounded whatever the value
# is (a YAML alias bomb's list of a billion shared lists, a 100 MB string).
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 2, 4, 4, 4
_BRIEF.maxset = _BRIEF.maxfrozenset = _BRIEF.maxdeque = _BRIEF.maxarray = 4
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(value: Any) -> str:
    """``repr(value)`` cut to a few items and at most 100 characters, for messages.

    Every message that shows a value from a file, a flag or the environment uses this, never
    ``repr``: an unbounded value must not make an unbounded message (or take minutes to print).
    """
    text = _BRIEF.repr(value)
    return text if len(text) <= 100 else text[:97] + "..."
