"""What the pack raises to users. Its own module, below everything else, so that the math
(functional/) and the file format (state.py, read.py, ...) can both raise it."""


class ParaError(ValueError):
    """A user-facing error: says what is wrong, where (file, layer, node input), and what to do."""


class FingerprintWarning(UserWarning):
    """An adapter made against other base weights (a fine-tune of its base, or another model)."""
