"""The exception type every user-facing error in lorakit derives from."""


class LoraError(ValueError):
    """Bad input to lorakit: the message names the problem and how to fix it.

    Subclasses ``ValueError`` so code that already guards against bad values keeps working.
    """
