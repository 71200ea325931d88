"""The root of every error a user can fix: the CLI prints these as one line, no traceback."""
from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """Bad input or environment; the message names the file/tensor and what to do."""


def problem_list(items: Iterable[object], limit: int = 50) -> str:
    """The lines under an error's first line: one `  - item` each, the first `limit`, then a count."""
    shown = [f"  - {str(item).replace(chr(10), chr(10) + '    ')}" for item in items]
    more = len(shown) - limit
    return "\n".join(shown[:limit]) + (f"\n  … and {more} more" if more > 0 else "")
