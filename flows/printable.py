"""Names as a terminal table may show them: one line, no escape sequences, nothing that cannot print.

Tensor, file and checkpoint names come from users' files and listings: a name holding a newline
breaks a table's rows, an ESC sequence rewrites the terminal, a lone surrogate (a file name that is
not UTF-8, as Python decodes it) makes `print` raise. `printable()` writes each such character as
a Python-style escape, so what is shown is one line and still says which name it is.
"""
from __future__ import annotations

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape): show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(name: object) -> str:
    """`name` with control characters (C0, DEL, C1), line and paragraph separators, format
    characters (bidi overrides) and surrogates escaped; every other character as it is."""
    text = str(name)
    if text.isprintable():  # the common case costs one scan
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
