"""The errors users see: a message that says what is wrong and what to do, of a kind the server maps to an
HTTP status (the CLI prints any of them as one red line and exits non-zero)."""

from __future__ import annotations


class TuneloopError(Exception):
    """A problem the user can fix: bad input or config (HTTP 422)."""


class NotFound(TuneloopError):
    """What was named does not exist: a model, a version, a prediction, a turn, a job (HTTP 404)."""


class Conflict(TuneloopError):
    """The request is fine but the state does not allow it now: a job already running (HTTP 409)."""


class TooManyRequests(TuneloopError):
    """A limit on how often a sender may do something was reached; retry after `retry_after` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class Unavailable(TuneloopError):
    """The server cannot answer now, e.g. it is shutting down; try again or elsewhere (HTTP 503)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message: library errors often add pages of detail."""
    return (str(error).splitlines() or [type(error).__name__])[0]
