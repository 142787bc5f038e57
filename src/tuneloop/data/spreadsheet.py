"""CSV files people open in a spreadsheet: users' texts must show as text there, never run as formulas."""

from __future__ import annotations

from typing import Any

# A cell starting with one of these is a formula to a spreadsheet (CSV injection): users' texts are not.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """A text a spreadsheet shows as text: a leading ' before a formula start (OWASP's advice)."""
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def from_spreadsheet(value: str) -> str:
    """A text as it was before `spreadsheet_safe`, for a file that comes back from a person's spreadsheet."""
    return value[1:] if value.startswith("'") and value[1:].startswith(FORMULA_STARTS) else value
