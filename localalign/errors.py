"""The one exception type a user can cause.

Anything the user can get wrong (a missing file, a malformed line, an unknown model)
raises `UserError` with a message that fits on one line; the CLI prints it and exits 2.
Every other exception is our bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""
