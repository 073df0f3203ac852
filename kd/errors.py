"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class KDError(Exception):
    """A problem with the user's input (flags, files, data); never a bug in proxykd."""


class NonFiniteError(KDError):
    """A run stopped because its loss, C or weights stopped being finite (the learning rate is too high, most often)."""
