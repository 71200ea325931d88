"""One loader for the JSON tables: MP presets, fused groups, the Megatron table, dtype exceptions.

A table is built in (read by name from this package with importlib.resources) or a user's file
at any fsspec URL or local path. A user's file is input: it is read through a size cap and the
strict JSON parser (`ckptflow.storage.strict_json`: no NaN, no duplicate keys, no stack
overflow), then validated by the table's frozen pydantic model. Every failure is one
`TableError` that names the table ("built-in preset deepseek-v3", "preset s3://b/mine.json"),
the row (its index and its text) and the fix; the fix for a field comes from the table kind's
`fixes`, so the messages stay as specific as hand-written checks.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, PrivateAttr, ValidationError

from ckptflow.storage.strict_json import JSONRefused, loads, lone_surrogate, short
from ckptflow.storage.urls import StorageError, open_location
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.presets.patterns import NameMatcher

MAX_TABLE_BYTES = 1 << 20  # the largest built-in table is 8 KB; a name table of 1 MiB is not one
M = TypeVar("M", bound=BaseModel)


class TableError(PlanError):
    """A table cannot be read or says something impossible; the message names table, row and fix."""


@dataclass(frozen=True)
class TableKind:
    noun: str                              # "preset": how messages name a table of this kind
    builtins: Mapping[str, str]            # built-in name → file in ckptflow.tasks.presets
    fixes: Mapping[str, str] = field(default_factory=dict)  # "rules.split" → what a value there must be

    def label(self, ref: str) -> str:
        if ref not in self.builtins:
            return f"{self.noun} {ref}"
        return f"built-in {self.noun}" + (f" {self.canonical(ref)}" if len(set(self.builtins.values())) > 1 else "")

    def canonical(self, ref: str) -> str:
        """The first name of a built-in table (aliases such as deepseek_v3 name the same file)."""
        return next(n for n, f in self.builtins.items() if f == self.builtins[ref])


def no_comments(section: Any) -> Any:
    """A table section without its '_about'-style keys (comments)."""
    return {k: v for k, v in section.items() if not k.startswith("_")} if isinstance(section, dict) else section


class RuleTable(BaseModel):
    """What the Megatron tables share: rows whose `source` patterns are compiled once into one
    matcher, and a label that names the table in messages (set by `parse_table`'s context)."""

    _label: str = PrivateAttr("table <memory>")

    def model_post_init(self, context: Any) -> None:
        if context:
            self._label = context["label"]
        self.matcher  # compiled once, now

    @cached_property
    def matcher(self) -> NameMatcher:
        return NameMatcher([r.source for r in self.rules])  # type: ignore[attr-defined]

    @property
    def label(self) -> str:
        """How messages name it: 'built-in Megatron table', or 'Megatron table <url>'."""
        return self._label

    def first_row(self, name: str) -> tuple[Any, dict[str, int]] | None:
        """(row, integer captures) of the first row whose pattern matches `name`, or None."""
        hit = self.matcher.match(name)
        if hit is None:
            return None
        return self.rules[hit[0]], {k: int(v) for k, v in hit[1].items()}  # type: ignore[attr-defined]


@lru_cache(maxsize=None)
def _builtin_text(file: str) -> str:
    return resources.files("ckptflow.tasks.presets").joinpath(file).read_text("utf-8")


def _read_user(kind: TableKind, ref: str, storage_options: dict[str, Any] | None) -> bytes:
    label = kind.label(ref)
    try:
        loc = open_location(ref, storage_options)
        with loc.fs.open(loc.root, "rb") as f:
            raw = f.read(MAX_TABLE_BYTES + 1)
    except FileNotFoundError:
        if len(set(kind.builtins.values())) > 1:
            raise TableError(f"{label}: no such file and no such built-in {kind.noun} "
                             f"({', '.join(sorted(kind.builtins))}); pass a built-in name, or the path or "
                             "URL of a JSON file in the same format") from None
        raise TableError(f"{label}: file not found; pass the path or URL of a JSON file in the format "
                         f"of the built-in {kind.noun}") from None
    except StorageError as exc:
        raise TableError(f"{label}: {exc}") from None
    except (OSError, ValueError) as exc:
        raise TableError(f"{label}: cannot read it ({short(str(exc), 160)})") from None
    if len(raw) > MAX_TABLE_BYTES:
        raise TableError(f"{label}: larger than {MAX_TABLE_BYTES >> 20} MiB; no {kind.noun} is, so this is "
                         "not one")
    return raw


def read_table(kind: TableKind, ref: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(parsed JSON document, label) of built-in table `ref`, or of the file at URL or path `ref`."""
    label = kind.label(ref)
    raw = _builtin_text(kind.builtins[ref]) if ref in kind.builtins else _read_user(kind, ref, storage_options)
    try:
        doc = loads(raw)
    except JSONRefused as exc:
        raise TableError(f"{label}: {exc}") from None
    if (bad := lone_surrogate(doc)) is not None:
        raise TableError(f"{label}: the string {short(bad, 80)} holds a lone UTF-16 surrogate; not text")
    return doc, label


def parse_table(kind: TableKind, model: type[M], doc: Any, label: str, **context: Any) -> M:
    """`model` validated from `doc`; the first problem becomes a `TableError` naming row and fix."""
    try:
        return model.model_validate(doc, context={"label": label, **context})
    except ValidationError as exc:
        raise TableError(f"{label}: {explain(exc, doc, model, kind.fixes)}") from None


def load_table(kind: TableKind, model: type[M], ref: str, storage_options: dict[str, Any] | None = None,
               **context: Any) -> M:
    doc, label = read_table(kind, ref, storage_options)
    source = kind.canonical(ref) if ref in kind.builtins else ref
    return parse_table(kind, model, doc, label, source=source, **context)


def _row(doc: Any, loc: tuple[Any, ...]) -> tuple[str, str]:
    """('rules[3]', text of that row) for the deepest list index in `loc`; ('', '') at top level."""
    last = max((i for i, p in enumerate(loc) if isinstance(p, int)), default=-1)
    node, where = doc, ""
    for p in loc[:last + 1]:
        where += f"[{p}]" if isinstance(p, int) else (f".{p}" if where else p)
        if isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
        else:
            node = node.get(p) if isinstance(node, dict) else None
    return where, ("" if last < 0 else short(node))


def _fields_at(model: type[BaseModel], path: list[str]) -> list[str]:
    """The keys the model nested at `path` (string steps only) accepts, for 'unknown key' messages."""
    for step in path:
        info = model.model_fields.get(step)
        todo, found = [info.annotation] if info else [], None
        while todo and found is None:
            t = todo.pop()
            found = t if isinstance(t, type) and issubclass(t, BaseModel) else None
            todo.extend(get_args(t))
        if found is None:
            return []
        model = found
    return sorted(model.model_fields)


def explain(exc: ValidationError, doc: Any, model: type[BaseModel], fixes: Mapping[str, str]) -> str:
    errors = exc.errors(include_url=False)
    # A misspelt key also makes a required one missing: the unknown key is the news.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = first["loc"]
    where, row = _row(doc, loc)
    head = f"{where} {row}: " if row else f"{where}: " if where else ""
    if first["type"] == "extra_forbidden":
        keys = [str(e["loc"][-1]) for e in errors if e["type"] == "extra_forbidden" and e["loc"][:-1] == loc[:-1]]
        known = _fields_at(model, [p for p in loc[:-1] if isinstance(p, str)])
        return f"{head}unknown key(s) {keys}; known: {known}"
    if first["type"] == "value_error":
        return head + str(first["ctx"]["error"])
    path = [str(p) for p in loc if isinstance(p, str)]
    for key in [".".join(path[:n]) for n in range(len(path), 0, -1)] or [""]:
        if (fix := fixes.get(key)) is not None:
            return head + fix
    return f"{head}{'.'.join(path) or 'the table'}: {first['msg'].lower()}, got {short(first.get('input'), 80)}"
