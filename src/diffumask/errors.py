"""The base of every error a user can fix: the command line prints its message, no traceback."""


class DiffumaskError(Exception):
    """Bad input or an unusable model/folder; the message names the problem and the fix."""


class ConfigError(DiffumaskError, ValueError):
    """An option's value cannot work (a resolution that was not recorded, a layer that does not exist)."""
