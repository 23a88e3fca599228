"""The one exception type for mistakes a user can fix (bad input, missing files, bad params)."""


class SceneMLError(Exception):
    """A user-facing error: entry points print its message as one line and exit non-zero."""
