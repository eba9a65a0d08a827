"""User-facing errors: one clear message naming the problem and the fix."""


class CtscaleError(Exception):
    """An error caused by input (config, data, mask file, checkpoint), not by a bug.

    The CLI prints ``str(err)`` without a stack trace and exits with status 2.
    """


class ConfigError(CtscaleError):
    """A config file or override is malformed, unknown or out of range."""


class MaskError(CtscaleError):
    """A mask file is corrupt, of another format version, or does not fit the model."""


class DataError(CtscaleError):
    """A data file or split is missing, empty or has the wrong layout."""
