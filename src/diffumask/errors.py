"""The base of every error a user can fix: the command line prints its message, no traceback."""


class DiffumaskError(Exception):
    """Bad input or an unusable model/folder; the message names the problem and the fix."""


class ConfigError(DiffumaskError, ValueError):
    """An option's value cannot work (a resolution that was not recorded, a layer that does not exist)."""


class UnreadableFile(DiffumaskError, ValueError):
    """An image or mask on disk that cannot be decoded (truncated, corrupt): named, with the fix."""


def one_line(error: BaseException) -> str:
    """The error's own message. An error raised in a DataLoader worker comes back to the parent re-raised by torch
    as the same type, its text the worker's whole traceback ending in ``module.Type: message``: then that message."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    kind = type(error)
    for name in (f"{kind.__module__}.{kind.__qualname__}", kind.__qualname__):  # builtins print unqualified
        _, found, message = text.rpartition(f"\n{name}: ")
        if found:
            return message.strip()
    return text.rstrip().splitlines()[-1]
