"""The error types r1kit raises for people: each message names what is wrong and how to fix it."""


class R1kitError(ValueError):
    """Base class: bad input that a user can fix (the CLI prints the message without a traceback).

    ``param`` names the setting or request field at fault, where there is one (``temperature``,
    ``--dtype``): the HTTP API reports it as the error's OpenAI ``param``, so no caller has to guess
    the field from the message. Callers that pass only a message get ``param=None``.
    """

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        self.param = param


class ConfigError(R1kitError):
    """A configuration value is missing, unknown or out of range."""


class CheckpointError(R1kitError):
    """A checkpoint directory or file is missing, truncated or of an unsupported kind."""
