"""JSON from files a user hands us (safetensors headers, index, config), strict and bounded.

`json.loads` on hostile bytes costs far more memory than the bytes — 100 MB of `[],` is 33 M
lists, about 2 GB — takes what other readers refuse (NaN, Infinity, duplicate keys, lone
surrogates, `-0` as an integer) and raises RecursionError on deep nesting. Here a `Budget`
first bounds the object graph by counting bytes — every JSON object starts with a literal `{`,
every object member has a literal `:`, every further array or object item follows a literal
`,` — then `loads` parses with hooks that refuse what safetensors' serde_json refuses.
Characters inside strings only raise those counts, so escapes cannot hide anything from them.
"""
from __future__ import annotations

import gc
import json
import reprlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


class JSONRefused(ValueError):
    """Why a document was refused; the message is short and quotes ≤ ~200 characters of input."""


@dataclass(frozen=True)
class Budget:
    """Upper bounds on a document's structure, each with the reason it is a bound."""

    objects: int          # count of '{'
    members: int          # count of ':' — object members (a member costs ~300 bytes parsed)
    items: int            # count of ',' + '[' — list items and lists (~60 bytes each parsed)
    why: str              # the end of each refusal: why more is not a real file

    def check(self, raw: bytes, start: int = 0, end: int | None = None) -> None:
        end = len(raw) if end is None else end
        for label, found, limit in (("JSON objects ('{')", raw.count(b"{", start, end), self.objects),
                                    ("object members (':')", raw.count(b":", start, end), self.members),
                                    ("list items (',' and '[')",
                                     raw.count(b",", start, end) + raw.count(b"[", start, end), self.items)):
            if found > limit:
                raise JSONRefused(f"has {found} {label}, more than the {limit} allowed; {self.why}")


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlong = 120, 120, 60
_short.maxlist, _short.maxtuple, _short.maxdict, _short.maxlevel = 8, 8, 6, 3


def short(obj: Any, limit: int = 200) -> str:
    """A repr of `obj` of at most `limit` characters; costs O(limit), whatever the size of `obj`."""
    text = _short.repr(obj)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def kind(obj: Any) -> str:
    """'a list', 'a string', … — the JSON name of a value's type, for messages."""
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "a boolean"
    return {dict: "an object", list: "a list", str: "a string", int: "an integer",
            float: "a number with a fraction"}.get(type(obj), type(obj).__name__)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise JSONRefused(f"has the key {short(dup)} twice in one object; which one is meant is ambiguous")
    return out


def _no_constant(name: str) -> Any:
    raise JSONRefused(f"contains {name}, which is not JSON")


def _int_or_negative_zero(text: str) -> int | float:
    # serde_json (safetensors) reads `-0` as the float -0.0; so do we, and then refuse it as a dim.
    return -0.0 if text == "-0" else int(text)


def loads(text: str | bytes, *, unique_keys: bool = True, allow_nan: bool = False,
          serde_numbers: bool = False) -> Any:
    """`json.loads`, refusing what strict readers refuse; every failure is a `JSONRefused`.

    `serde_numbers` reads `-0` as a float, as serde_json does (only worth it for headers).
    """
    kwargs: dict[str, Any] = {}
    if unique_keys:
        kwargs["object_pairs_hook"] = _unique_pairs
    if not allow_nan:
        kwargs["parse_constant"] = _no_constant
    if serde_numbers and ("-0" in text if isinstance(text, str) else b"-0" in text):
        kwargs["parse_int"] = _int_or_negative_zero
    try:
        return json.loads(text, **kwargs)
    except JSONRefused:
        raise
    except RecursionError:
        raise JSONRefused("is nested deeper than any real file (Python's JSON parser gives up)") from None
    except json.JSONDecodeError as exc:
        raise JSONRefused(f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise JSONRefused(f"is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    except ValueError as exc:  # an integer of more than 4300 digits, and the like
        raise JSONRefused(f"is not valid JSON ({short(str(exc), 120)})") from None


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while a big document is parsed and converted: JSON trees have no cycles, and
    each of the many collections that millions of new containers trigger rescans the whole heap
    (a third of the time of a 200k-tensor header). Nested and thread-safe."""
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def lone_surrogate(obj: Any) -> str | None:
    """The first string (key or value) in `obj` holding a lone UTF-16 surrogate, if any.

    Python's json turns `"\\udc80"` into such a string; it cannot be encoded as UTF-8, and
    serde_json refuses it. Iterative, so depth costs no stack.
    """
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            if not x.isascii():
                try:
                    x.encode("utf-8")
                except UnicodeEncodeError:
                    return x
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return None
