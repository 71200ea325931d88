"""Module patterns from quantization configs, matched in time linear in the name. Pure.

`compile_patterns(patterns, where)` reads a config's `ignore` / `targets` /
`modules_to_not_convert` / `exclude_modules` list once, refusing (PlanError naming the pattern
and `where`) anything outside the linear-time subset or over the caps; `Matcher.matches(name)`
and `Matcher.first(name)` then answer per module name. The meaning is compressed-tensors' and
ckptflow's own, unchanged:

- `re:REGEX` — `re.match` (anchored at the start, any prefix may match);
- a pattern with `*` — a glob over the whole name, `*` being any run of non-newline characters;
- with `classes_match` (targets), a class name (`Linear`: capitalised, no dot) — every module;
- anything else — the name itself, or the name's tail after a dot (`lm_head` ~ `model.lm_head`).

Regexes and globs run as one NFA (`linear_regex`) simulated by a lazy DFA: each (state set,
character) step is computed once and cached, so ~90k names of a big MoE cost a dict lookup per
character; the cache is dropped when it grows past MAX_DFA_NODES, which bounds memory and keeps
the worst case at O(len(name) × NFA states). Plain names are a dict lookup per dot.
"""
from __future__ import annotations

from collections.abc import Sequence

from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.planners.linear_regex import ACCEPT, ASSERT, CHAR, Nfa, Unsupported, class_pred, glob_tree, \
    parse_regex

# Real configs list a few hundred patterns of under 200 characters (a name per ignored layer).
MAX_PATTERNS, MAX_PATTERN_CHARS, MAX_NFA_STATES = 10_000, 1000, 50_000
MAX_DFA_NODES, MAX_PREFIXES = 10_000, 200_000
MAX_PREFIX_CHARS = 256  # dotted prefixes remembered up to this length: a hostile name's are not all kept
_NONE = 1 << 62  # "no pattern": larger than any index
_is_word = class_pred(r"\w")


class _Node:
    """A DFA state: the NFA states reached (before their epsilon closure), and whether the
    previous character was a word character (only `\\b` looks at it)."""

    __slots__ = ("core", "prev_word", "at_start", "trans", "end")

    def __init__(self, core: frozenset[int], prev_word: bool, at_start: bool) -> None:
        self.core, self.prev_word, self.at_start = core, prev_word, at_start
        self.trans: dict[str, tuple[int, _Node]] = {}  # char → (first prefix match before it, next)
        self.end: int | None = None                     # first pattern matching if the name ends here


class Matcher:
    """Which of `patterns` (read from `where`) a module name matches."""

    def __init__(self, patterns: Sequence[str], where: str, classes_match: bool = False) -> None:
        self.patterns, self.where = tuple(patterns), where
        self._always = _NONE                   # first class-name pattern (targets only)
        self._names: dict[str, int] = {}       # plain name → first index
        self._nfa = Nfa(MAX_NFA_STATES)
        for index, p in enumerate(self.patterns):
            kind = "re" if p.startswith("re:") else "glob" if "*" in p else \
                "class" if classes_match and p[:1].isupper() and "." not in p else "name"
            if kind == "class":
                self._always = min(self._always, index)
            elif kind == "name":
                self._names.setdefault(p, index)
            else:
                try:
                    self._nfa.add_pattern(parse_regex(p[3:]) if kind == "re" else glob_tree(p), index, kind == "glob")
                except Unsupported as exc:
                    hint = ("fix it" if str(exc).startswith("is not a valid regex") else
                            "write it with literals, classes, groups, | and * + ? {m,n} only")
                    raise PlanError(f"{where}: pattern {p[:80]!r} {exc}; {hint} (nothing was written)") from None
        self._lengths = set(map(len, self._names))
        self._longest = max(self._lengths, default=0)
        self.steps = 0  # characters scanned + NFA states visited: what the linear bound is about
        self._nodes: dict[tuple[frozenset[int], bool, bool], _Node] = {}
        self._prefixes: dict[str, tuple[_Node, int]] = {}  # dotted prefix → (node after it, first hit)
        self._start = self._node(frozenset(self._nfa.starts), False, True)

    def matches(self, name: str) -> bool:
        return self._always != _NONE or self._name_hit(name, True) != _NONE or self._scan(name, True) != _NONE

    def first(self, name: str) -> str | None:
        """The first pattern (in the config's order) that `name` matches, or None."""
        index = min(self._always, self._name_hit(name, False), self._scan(name, False))
        return None if index == _NONE else self.patterns[index]

    def _name_hit(self, name: str, any_hit: bool) -> int:
        """First plain pattern equal to `name` or to a tail of it after a dot."""
        names = self._names
        if not names:
            return _NONE
        best = names.get(name, _NONE)
        lo = max(0, len(name) - self._longest - 1)  # tails longer than every pattern cannot match
        dot = name.rfind(".", lo)
        while dot >= 0 and not (any_hit and best != _NONE):
            if len(name) - dot - 1 in self._lengths:  # slice only tails some pattern is as long as
                index = names.get(name[dot + 1:])
                if index is not None and index < best:
                    best = index
            dot = name.rfind(".", lo, dot)
        return best

    def _scan(self, name: str, any_hit: bool) -> int:
        """First pattern index the NFA part matches (with `any_hit`, any index, as soon as seen)."""
        node, best, pos = self._start, _NONE, 0
        if not node.core:
            return best
        dot = name.rfind(".", 0, MAX_PREFIX_CHARS + 1)
        while dot > 0:  # resume after the longest dotted prefix seen before: names share them by thousands
            seen = self._prefixes.get(name[:dot])
            if seen is not None:
                node, best = seen
                pos = dot
                break
            dot = name.rfind(".", 0, dot)
        final = "\n$" if self._nfa.uses_dollar and name.endswith("\n") else ""  # re's `$` matches before it
        end = len(name) - bool(final)
        self.steps += len(name) - pos
        while (best == _NONE or not any_hit) and node.core:
            dot = name.find(".", pos + 1, end)
            stop = end if dot < 0 else dot
            for ch in name[pos:stop]:
                hit, node = node.trans.get(ch) or self._step(node, ch)
                if hit < best:
                    best = hit
                    if any_hit:
                        return best
                if not node.core:
                    return best
            if stop == end:
                break
            if stop <= MAX_PREFIX_CHARS:
                if len(self._prefixes) >= MAX_PREFIXES:
                    self._prefixes.clear()
                self._prefixes[name[:stop]] = (node, best)
            pos = stop
        else:
            return best
        if final:
            hit, node = node.trans.get(final) or self._step(node, final)
            best = min(best, hit)
        if node.end is None:
            node.end = self._closure(node, None)[0]
        return min(best, node.end)

    def _node(self, core: frozenset[int], prev_word: bool, at_start: bool) -> _Node:
        key = (core, prev_word, at_start)
        node = self._nodes.get(key)
        if node is None:
            if len(self._nodes) >= MAX_DFA_NODES:  # forget the cache; nodes in use keep working
                for old in self._nodes.values():
                    old.trans.clear()
                self._nodes.clear()
                self._prefixes.clear()
            node = self._nodes[key] = _Node(core, prev_word, at_start)
        return node

    def _step(self, node: _Node, key: str) -> tuple[int, _Node]:
        ch = key[0]
        hit, chars = self._closure(node, key)
        nfa = self._nfa
        core = frozenset(nfa.outs[s][0] for s in chars
                         if (ch == nfa.arg[s] if type(nfa.arg[s]) is str else nfa.arg[s](ch)))
        step = (hit, self._node(core, self._nfa.uses_word and bool(_is_word(ch)), False))
        node.trans[key] = step
        return step

    def _closure(self, node: _Node, key: str | None) -> tuple[int, list[int]]:
        """Epsilon closure before the character `key` (None: the end of the name): the first
        pattern accepted there (a glob only at the end) and the character states reached."""
        nfa, hit, chars = self._nfa, _NONE, []
        next_word = key is not None and bool(_is_word(key[0]))
        at_end = key is None or key == "\n$"  # re's `$` also matches before a final newline
        seen, stack = set(node.core), list(node.core)
        while stack:
            s = stack.pop()
            op = nfa.op[s]
            if op == CHAR:
                chars.append(s)
                continue
            if op == ACCEPT:
                index, full = nfa.arg[s]
                if (key is None or not full) and index < hit:
                    hit = index
                continue
            if op == ASSERT:
                kind = nfa.arg[s]
                holds = (node.at_start if kind in ("^", "A") else at_end if kind == "$" else
                         key is None if kind == "Z" else node.prev_word != next_word)
                if not holds:
                    continue
            for t in nfa.outs[s]:
                if t not in seen:
                    seen.add(t)
                    stack.append(t)
        self.steps += len(seen)
        return hit, chars


def compile_patterns(patterns: Sequence[str], where: str, classes_match: bool = False) -> Matcher:
    """A Matcher for a config's pattern list; PlanError (naming `where` and the pattern) when the
    list is not a list of strings, too long, or a pattern cannot be matched in linear time."""
    if isinstance(patterns, str) or not isinstance(patterns, Sequence) \
            or not all(isinstance(p, str) for p in patterns):
        raise PlanError(f"{where} must be a list of module names or patterns, got {type(patterns).__name__}")
    if len(patterns) > MAX_PATTERNS:
        raise PlanError(f"{where}: {len(patterns)} patterns; no real config has more than {MAX_PATTERNS}")
    for p in patterns:
        if len(p) > MAX_PATTERN_CHARS:
            raise PlanError(f"{where}: pattern {p[:80]!r}… is {len(p)} characters; the limit is "
                            f"{MAX_PATTERN_CHARS} (no real module pattern is longer)")
    return Matcher(patterns, where, classes_match)
