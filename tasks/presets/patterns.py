"""The placeholder language of name tables, compiled once: `{layer}`, `{expert}` and `{a|b}`.

MP presets and the Megatron table both write a row's source as a tensor name with holes:
`{layer}` and `{expert}` each match a run of digits and may reappear in the target;
`{a|b|…}` matches any one of the spellings (Megatron renamed `transformer` → `encoder`), and
captures nothing. Every other character is literal. A table's rows compile into *one*
alternation regex (`NameMatcher`): Python tries alternatives left to right, so the first row
that matches the whole name wins, in one C-level call per name — DeepSeek-V3 has ~90k tensor
names, and a Python loop over its 39 rows costs seconds.
"""
from __future__ import annotations

import re
import string
from collections.abc import Sequence

PLACEHOLDERS = ("layer", "expert")  # the captures; each matches \d+
_HOLE = re.compile(r"\{([^{}]*)\}")
HELP = "write {layer}, {expert} (digits) or {a|b} (either spelling); other braces are not allowed"


class PatternError(ValueError):
    """A source pattern or target the placeholder language cannot read; the message says why."""


def _pieces(pattern: str) -> list[tuple[str, str]]:
    """(literal, hole) pairs; the last hole is ''. Refuses stray braces and unknown names."""
    out, pos = [], 0
    for m in _HOLE.finditer(pattern):
        out.append((pattern[pos:m.start()], m.group(1)))
        pos = m.end()
    out.append((pattern[pos:], ""))
    for literal, hole in out:
        if "{" in literal or "}" in literal:
            raise PatternError(f"pattern {pattern!r} has an unmatched brace; {HELP}")
        if hole and "|" not in hole and hole not in PLACEHOLDERS:
            raise PatternError(f"pattern {pattern!r}: {{{hole}}} is not a placeholder; {HELP}")
        if "|" in hole and not all(hole.split("|")):
            raise PatternError(f"pattern {pattern!r}: {{{hole}}} has an empty spelling; {HELP}")
    return out


def captures(pattern: str) -> tuple[str, ...]:
    """The placeholders `pattern` captures, in order; each may appear once."""
    names = tuple(h for _, h in _pieces(pattern) if h in PLACEHOLDERS)
    if len(set(names)) != len(names):
        raise PatternError(f"pattern {pattern!r} uses a placeholder twice; {{layer}} and {{expert}} "
                           "may each appear at most once")
    return names


def regex_of(pattern: str, tag: str = "") -> str:
    """Regex text for `pattern`; captures are named `<tag><placeholder>` (tags keep rows apart)."""
    captures(pattern)  # validates
    out = []
    for literal, hole in _pieces(pattern):
        out.append(re.escape(literal))
        if hole in PLACEHOLDERS:
            out.append(rf"(?P<{tag}{hole}>\d+)")
        elif hole:
            out.append("(?:" + "|".join(map(re.escape, hole.split("|"))) + ")")
    return "".join(out)


def target_fields(target: str, captured: Sequence[str]) -> tuple[str, ...]:
    """The placeholders `target` fills in; each must be one its pattern captures, spelled bare."""
    try:
        parsed = list(string.Formatter().parse(target))
    except ValueError as exc:
        raise PatternError(f"target {target!r}: {exc}; write {{layer}} or {{expert}}, nothing else "
                           "in braces") from None
    fields = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if spec or conversion or name not in captured:
            raise PatternError(f"target {target!r} uses a placeholder its pattern does not capture: "
                               f"{{{name}}} (the pattern captures "
                               f"{', '.join('{' + c + '}' for c in captured) or 'nothing'})")
        fields.append(name)
    return tuple(fields)


class NameMatcher:
    """First row whose pattern matches the whole name: (row index, captures) or None."""

    def __init__(self, patterns: Sequence[str]) -> None:
        parts = [f"(?P<r{i}>{regex_of(p, f'r{i}_')})" for i, p in enumerate(patterns)]
        self._regex = re.compile("|".join(parts) or r"(?!)")
        self._groups = tuple(tuple((c, f"r{i}_{c}") for c in captures(p)) for i, p in enumerate(patterns))

    def match(self, name: str) -> tuple[int, dict[str, str]] | None:
        m = self._regex.fullmatch(name)
        if m is None:
            return None
        row = int(m.lastgroup[1:])  # type: ignore[index]  # the outer group closes last: "r<row>"
        return row, {c: m.group(g) for c, g in self._groups[row]}
