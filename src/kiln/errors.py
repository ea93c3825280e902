"""The one exception type the CLI turns into a one-line error message."""


class KilnError(Exception):
    """A problem with the user's input: the message names the problem and the fix.

    The CLI prints it as a single line and exits non-zero (traceback only with --debug).
    """
