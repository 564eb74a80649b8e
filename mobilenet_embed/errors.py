"""The one exception type for user errors (bad config, bad data, bad path).

The CLI turns a `UserError` into a single line `Error: <message>` and exit code 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message names the file, line or config key."""
