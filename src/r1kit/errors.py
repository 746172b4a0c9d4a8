"""The error types r1kit raises for people: each message names what is wrong and how to fix it."""


class R1kitError(ValueError):
    """Base class: bad input that a user can fix (the CLI prints the message without a traceback)."""


class ConfigError(R1kitError):
    """A configuration value is missing, unknown or out of range."""


class CheckpointError(R1kitError):
    """A checkpoint directory or file is missing, truncated or of an unsupported kind."""
