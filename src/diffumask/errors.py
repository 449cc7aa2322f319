"""The base of every error a user can fix: the command line prints its message, no traceback."""

import json
from collections.abc import Callable
from typing import Any


class DiffumaskError(Exception):
    """Bad input or an unusable model/folder; the message names the problem and the fix."""


class ConfigError(DiffumaskError, ValueError):
    """An option's value cannot work (a resolution that was not recorded, a layer that does not exist)."""


class UnreadableFile(DiffumaskError, ValueError):
    """An image or mask on disk that cannot be decoded (truncated, corrupt): named, with the fix; ``reason``: the
    decoder's own words, for a caller that words the fix itself (validate)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason


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


def check_sequences(owner: str, **fields: tuple[Any, str]) -> None:
    """Refuse a string (or a lone number, or a one-pass iterator) where ``owner`` takes a list: iterated letter by
    letter, ``"dog,cat"`` would fail far from here with a message about ``'d'``. ``fields``: name → (value, an
    example); None passes."""
    for name, (value, example) in fields.items():
        if value is not None and (isinstance(value, (str, bytes)) or not hasattr(value, "__iter__")
                                  or iter(value) is value):  # a generator: read once, here, and then empty
            raise ConfigError(f"{owner}.{name} takes a list, e.g. {example}, not {value!r}")


ABSENT = object()  # a setting one side does not record


def setting_differences(old: Any, new: Any, holder: str, key: str = "",
                        normalise: Callable[[str, Any], Any] = lambda key, value: value) -> list[str]:
    """Each setting that differs between a folder's recorded settings and a re-run's, by its dotted path with both
    values in full (``augment.seed differs: 0 in the dataset, 1 now``), so a user sees what to pass to resume, not
    a whole block of settings. A setting one side lacks is :data:`ABSENT` there, unequal to any value unless
    ``normalise(key, value)``, what is compared, makes it one."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [change for name in sorted(set(old) | set(new))
                for change in setting_differences(old.get(name, ABSENT), new.get(name, ABSENT), holder,
                                                  f"{key}.{name}" if key else name, normalise)]
    if normalise(key, old) == normalise(key, new):
        return []
    return [f"{key} differs: {_shown(old)} in the {holder}, {_shown(new)} now"]


def _shown(value: Any) -> str:
    return "absent" if value is ABSENT else json.dumps(value)
