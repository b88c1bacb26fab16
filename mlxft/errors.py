"""The one exception type that means "the user gave us something we cannot use".

The CLI prints such an error as a single line and exits non-zero; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a flag, a row. The message is the whole explanation."""


class NotImplementedYet(UserError):
    """A documented option that this version does not implement; says so instead of pretending."""
