"""The root of every error a user can fix: the CLI prints these as one line, no traceback."""


class UserError(Exception):
    """Bad input or environment; the message names the file/tensor and what to do."""
