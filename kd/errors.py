"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class KDError(Exception):
    """A problem with the user's input (flags, files, data); never a bug in proxykd."""
