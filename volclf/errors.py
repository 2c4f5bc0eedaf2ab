"""Exceptions whose message is meant for the user: it names the file or value and the fix."""


class VolclfError(Exception):
    """Base class: the command line prints the message without a traceback."""


class ConfigError(VolclfError):
    """A preset, profile or override is invalid."""


class DataError(VolclfError):
    """A data set, file or label is unusable."""


class PreflightError(VolclfError):
    """A check before submitting failed; nothing was submitted."""
