"""Errors raymix raises on purpose, with messages meant for the person who caused them."""


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is missing or malformed. The message names it."""


class RequestError(ValueError):
    """A request is invalid. `param` names the offending parameter (OpenAI's `error.param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class OverloadedError(RequestError):
    """The engine's queue is full: try again later (HTTP 429 with Retry-After)."""

    def __init__(self, message: str):
        super().__init__(message, param=None, code="overloaded")
