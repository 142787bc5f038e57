"""The one error type users see: a message that says what is wrong and what to do."""

from __future__ import annotations


class TuneloopError(Exception):
    """A problem the user can fix; the CLI prints it as one red line and exits non-zero."""
