"""Config patterns (`re:` regexes and `*` globs) as one Thompson NFA. Pure; nothing backtracks.

Python's `re` backtracks: `re:(.|\\w)+@` or fourteen `.*` in a row take minutes on one module
name, and no guard on the pattern's shape catches them all. So patterns are parsed here into an
NFA that `linear_match` simulates (a set of states per character: time linear in the name).

The subset, with `re`'s own meaning: literals and escapes (`\\.`, `\\n`, `\\x41`, …), `\\d \\w \\s`
and their negations, classes `[...]` (membership is decided by `re` itself on one character,
which cannot backtrack), `.`, groups `(...)`, `(?:...)`, `(?P<name>...)`, alternation, `* + ?`
and `{m,n}` (lazy forms too: same language), `^ $ \\A \\Z \\b`. Everything else (backreferences,
lookarounds, atomic groups, possessive quantifiers, inline flags, `\\B`) is refused by name.
"""
from __future__ import annotations

import re
import warnings
from functools import lru_cache
from typing import Any, Callable, Union

MAX_REPEAT = 1000     # bound of one {m,n}; real configs use {1,3}
MAX_DEPTH = 32        # nested groups; re itself overflows Python's stack near 500
CHAR, SPLIT, ASSERT, ACCEPT = range(4)

Pred = Union[str, Callable[[str], Any]]  # one literal character, or a predicate on one character
Node = tuple  # ("c", pred) | ("seq", [nodes]) | ("alt", [nodes]) | ("rep", node, m, n|None) | ("at", kind)


class Unsupported(ValueError):
    """The pattern uses syntax outside the subset (or is not a regex); the message says which."""


def _not_newline(ch: str) -> bool:
    return ch != "\n"


@lru_cache(maxsize=4096)
def class_pred(text: str) -> Callable[[str], Any]:
    """`re` decides membership in `[...]`, `\\d`, `\\w`, `\\s`: on one character it cannot backtrack."""
    with warnings.catch_warnings():  # "possible nested set" FutureWarnings: the set still means what re says
        warnings.simplefilter("ignore")
        return re.compile(text).fullmatch


_SIMPLE_ESCAPES = {"a": "\a", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_HEX = {"x": 2, "u": 4, "U": 8}
_REFUSED_GROUPS = (("?=", "a lookahead"), ("?!", "a negative lookahead"), ("?<=", "a lookbehind"),
                   ("?<!", "a negative lookbehind"), ("?>", "an atomic group"), ("?P=", "a backreference"),
                   ("?(", "a conditional group"), ("?#", "a comment group"))


class _Parser:
    """Recursive descent over `re`'s grammar for the subset; positions in messages are re's."""

    def __init__(self, text: str) -> None:
        self.p, self.i = text, 0

    def refuse(self, what: str) -> Unsupported:
        return Unsupported(f"uses {what} (at position {self.i} of the regex), which the linear-time matcher "
                           "does not support")

    def peek(self, k: int = 0) -> str:
        return self.p[self.i + k] if self.i + k < len(self.p) else ""

    def parse(self) -> Node:
        node = self.alt(0)
        if self.i < len(self.p):  # a stray ')'
            raise self.refuse("an unbalanced ')'")
        return node

    def alt(self, depth: int) -> Node:
        branches = [self.seq(depth)]
        while self.peek() == "|":
            self.i += 1
            branches.append(self.seq(depth))
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def seq(self, depth: int) -> Node:
        items: list[Node] = []
        while self.i < len(self.p) and self.peek() not in "|)":
            atom = self.atom(depth)
            bounds = self.quantifier()
            if bounds is not None:
                if atom[0] == "at":
                    raise self.refuse("a quantifier on an anchor")
                atom = ("rep", atom, *bounds)
                if self.peek() == "?":
                    self.i += 1  # lazy: the same set of names matches
                elif self.peek() == "+":
                    raise self.refuse("a possessive quantifier")
                if self.quantifier() is not None:
                    raise self.refuse("a repeated quantifier")
            items.append(atom)
        return items[0] if len(items) == 1 else ("seq", items)

    def quantifier(self) -> tuple[int, int | None] | None:
        c = self.peek()
        if c in ("*", "+", "?") and c:
            self.i += 1
            return {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        if c == "{":
            m = re.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}").match(self.p, self.i)  # re's own {m,n} rule
            if m is None or m.group(0) == "{}":
                return None  # then "{" is a literal, as in re
            lo, comma, hi = m.group(1), m.group(2), m.group(3)
            low = int(lo) if lo else 0
            high = (int(hi) if hi else None) if comma else low
            if low > MAX_REPEAT or (high is not None and high > MAX_REPEAT):
                raise self.refuse(f"a repeat bound over {MAX_REPEAT} ({m.group(0)})")
            if high is not None and high < low:
                raise self.refuse(f"a repeat {m.group(0)} whose minimum is over its maximum")
            self.i = m.end()
            return low, high
        return None

    def atom(self, depth: int) -> Node:
        c = self.peek()
        if c == "(":
            return self.group(depth)
        if c == "[":
            return self.char_class()
        if c == "\\":
            return self.escape()
        if c in ("*", "+", "?") or (c == "{" and self.quantifier() is not None):
            raise self.refuse("a quantifier with nothing to repeat")
        self.i += 1
        if c == ".":
            return ("c", _not_newline)
        if c in ("^", "$"):
            return ("at", c)
        return ("c", c)

    def group(self, depth: int) -> Node:
        if depth >= MAX_DEPTH:
            raise self.refuse(f"groups nested deeper than {MAX_DEPTH}")
        self.i += 1
        if self.peek() == "?":
            rest = self.p[self.i:]
            if rest.startswith("?:"):
                self.i += 2
            elif rest.startswith("?P<") and ">" in rest:
                self.i += rest.index(">") + 1
            else:
                what = next((w for prefix, w in _REFUSED_GROUPS if rest.startswith(prefix)), "an inline flag")
                raise self.refuse(what)
        node = self.alt(depth + 1)
        if self.peek() != ")":
            raise self.refuse("an unterminated group")
        self.i += 1
        return node

    def char_class(self) -> Node:
        j = self.i + 1
        j += self.p.startswith("^", j)
        j += self.p.startswith("]", j)  # a ']' first is a member, as in re
        while j < len(self.p) and self.p[j] != "]":
            j += 2 if self.p[j] == "\\" else 1
        if j >= len(self.p):
            raise self.refuse("an unterminated character class")
        text, self.i = self.p[self.i:j + 1], j + 1
        try:
            return ("c", class_pred(text))
        except re.error as exc:
            raise self.refuse(f"a character class re cannot read ({exc})") from None

    def escape(self) -> Node:
        c = self.peek(1)
        self.i += 2
        if c in "dDsSwW" and c:
            return ("c", class_pred("\\" + c))
        if c in ("A", "Z", "b"):
            return ("at", c)
        if c in _SIMPLE_ESCAPES:
            return ("c", _SIMPLE_ESCAPES[c])
        if c in _HEX:
            digits = self.p[self.i:self.i + _HEX[c]]
            if len(digits) != _HEX[c] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.refuse(f"a malformed \\{c} escape")
            self.i += _HEX[c]
            return ("c", chr(int(digits, 16)))
        if c == "0":
            m = re.compile("[0-7]{0,2}").match(self.p, self.i)
            self.i = m.end()  # type: ignore[union-attr]
            return ("c", chr(int("0" + m.group(0), 8)))  # type: ignore[union-attr]
        if c.isascii() and c.isalnum():
            self.i -= 2
            raise self.refuse("a backreference" if c.isdigit() else f"the escape \\{c}")
        if not c:
            raise self.refuse("a trailing backslash")
        return ("c", c)  # \. \- \\ …: the character itself


def parse_regex(text: str) -> Node:
    """The syntax tree of `text`; Unsupported names what is outside the subset or not a regex."""
    try:
        node = _Parser(text).parse()
    except Unsupported as exc:
        problem: Exception = exc
    else:
        try:
            re.compile(text)  # depth is capped, so this is safe; it catches bad group names and such
            return node
        except re.error as exc:
            problem = exc
    try:
        re.compile(text)
    except re.error as exc:
        raise Unsupported(f"is not a valid regex: {exc}") from None
    except RecursionError:  # nested deeper than re itself can parse: the depth refusal says it
        pass
    raise problem


def glob_tree(text: str) -> Node:
    """`*` is any run of characters but a newline (re.escape + `.*`, fullmatch); the rest is literal."""
    return ("seq", [("rep", ("c", _not_newline), 0, None) if c == "*" else ("c", c) for c in text])


class Nfa:
    """States as parallel lists: op, argument, successors. Built backwards: each node is compiled
    with its continuation, so no patch lists are needed."""

    def __init__(self, max_states: int) -> None:
        self.op: list[int] = []
        self.arg: list[Any] = []
        self.outs: list[list[int]] = []
        self.starts: list[int] = []
        self.max_states = max_states
        self.uses_dollar = self.uses_word = False

    def add(self, op: int, arg: Any, outs: list[int]) -> int:
        if len(self.op) >= self.max_states:
            raise Unsupported(f"takes the list past {self.max_states} matcher states (each {{m,n}} copies "
                              "its group; the list's patterns count together)")
        self.op.append(op)
        self.arg.append(arg)
        self.outs.append(outs)
        return len(self.op) - 1

    def add_pattern(self, tree: Node, index: int, full: bool) -> None:
        """Pattern `index`: accepted at the end of the name (`full`) or after any prefix (re.match)."""
        accept = self.add(ACCEPT, (index, full), [])
        self.starts.append(self.build(tree, accept))

    def build(self, node: Node, nxt: int) -> int:
        kind = node[0]
        if kind == "c":
            return self.add(CHAR, node[1], [nxt])
        if kind == "seq":
            for item in reversed(node[1]):
                nxt = self.build(item, nxt)
            return nxt
        if kind == "alt":
            return self.add(SPLIT, None, [self.build(b, nxt) for b in node[1]])
        if kind == "at":
            self.uses_dollar |= node[1] == "$"
            self.uses_word |= node[1] == "b"
            return self.add(ASSERT, node[1], [nxt])
        _, child, low, high = node
        if high is None:  # a loop: split → child → back to the split, or on
            loop = self.add(SPLIT, None, [nxt])
            self.outs[loop].insert(0, self.build(child, loop))
            nxt = loop
        else:
            for _ in range(high - low):  # x{0,2} as x?x?: the same names
                nxt = self.add(SPLIT, None, [self.build(child, nxt), nxt])
        for _ in range(low):
            nxt = self.build(child, nxt)
        return nxt
