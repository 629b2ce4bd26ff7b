"""What the pack raises to users. Its own module, below everything else, so that the math
(functional/) and the file format (state.py, read.py, ...) can both raise it."""


def printable(text) -> str:
    """``text`` with every control or other non-printable character written as its escape
    (``\\x1b``, ``\\n``, ``\\ud800``), for logs and terminals: a name holding ANSI escapes or line
    breaks cannot recolour the console or forge a log line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ParaError(ValueError):
    """A user-facing error: says what is wrong, where (file, layer, node input), and what to do.
    ComfyUI logs the message: names in it (a file, a prefix) come from users, so it is kept
    printable."""

    def __init__(self, message="", *args):
        super().__init__(printable(message), *args)


class FingerprintWarning(UserWarning):
    """An adapter made against other base weights (a fine-tune of its base, or another model)."""
