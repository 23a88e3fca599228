"""The one exception type for mistakes a user can fix (bad input, missing files, bad params)."""


class SceneMLError(Exception):
    """A user-facing error: entry points print its message as one line and exit non-zero."""


class StoreUnreachable(SceneMLError):
    """The tracking store did not answer: nothing can be written to it, not even this error."""
