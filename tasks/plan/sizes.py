"""Byte sizes as users write them: one grammar for the CLI, flow parameters and planners.

'5GB' is 5·10⁹ bytes (as Hugging Face's `max_shard_size`), '1.5GiB' is 1.5·2³⁰, '500MB', '123'
or 123 are bytes. `SIZE_PATTERN` is the same grammar as a regular expression, for the JSON schema
of flow parameters (Prefect's UI and `--param` checks); `parse_size` is what everything calls.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ckptflow.tasks.plan.model import PlanError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE_PATTERN = r"^\s*([0-9]+(\.[0-9]*)?|\.[0-9]+)\s*([KkMmGgTt]([Ii])?[Bb]|[Bb])?\s*$"
_SIZE = re.compile(SIZE_PATTERN)
SIZE_HELP = "e.g. 5GB (5·10⁹ bytes), 500MB, 1.5GiB (2³⁰-based) or a number of bytes"


def parse_size(size: str | int) -> int:
    """'5GB' → 5·10⁹, '1.5GiB' → 1.5·2³⁰, '500MB', 123 or '123' → bytes; anything else raises."""
    value = None
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str) and (m := _SIZE.match(size)):
        try:
            value = int(Decimal(m.group(1)) * _UNITS[(m.group(3) or "").upper()])
        except InvalidOperation:
            value = None
    if value is None or value <= 0:
        raise PlanError(f"size {size!r} is not a positive size; write {SIZE_HELP}")
    return value
