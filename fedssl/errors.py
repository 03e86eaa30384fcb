"""The one exception type for mistakes a user can fix.

The command line turns a `UserError` into one line on stderr and exit code 2; any
other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad recipe key, a malformed data file, an incompatible checkpoint, ...

    The message must name what is wrong and where (key, file, row or path).
    """
