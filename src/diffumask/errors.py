"""The base of every error a user can fix: the command line prints its message, no traceback."""


class DiffumaskError(Exception):
    """Bad input or an unusable model/folder; the message names the problem and the fix."""


class ConfigError(DiffumaskError, ValueError):
    """An option's value cannot work (a resolution that was not recorded, a layer that does not exist)."""


class UnreadableFile(DiffumaskError, ValueError):
    """An image or mask on disk that cannot be decoded (truncated, corrupt): named, with the fix."""


def one_line(error: BaseException) -> str:
    """The error's message. An error raised in a DataLoader worker comes back to the parent re-raised by torch as
    the same type, its text the worker's whole traceback: then the traceback's last line, the original message."""
    text = str(error)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text
