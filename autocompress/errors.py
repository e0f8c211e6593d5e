"""Error types whose message is meant for the user as one line (the CLI prints it and exits 2)."""


class AutocompressError(Exception):
    """A problem the user can fix (bad input, missing file, unusable model); never a bug report."""


class ConfigError(AutocompressError):
    """An experiment file (or an override of it) is invalid; the message names the key path."""
