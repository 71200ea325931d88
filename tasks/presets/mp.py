"""Model-parallel presets: an ordered name-mapping table plus layout options, stored as JSON.

A preset is data (torchtitan / mergekit style): rows `[source pattern, target, split]` where
the pattern may hold `{layer}` and `{expert}` (each matches a run of digits) and the target may
reuse them. The first row whose pattern matches the whole name wins; a `null` target drops the
tensor. Split axes are named by meaning, as in Megatron-Bridge: COLUMN cuts dim 0 (output
features), ROW cuts dim 1 (input features), REPLICATED gives every rank the whole tensor, EXPERT
gives the whole tensor to the one rank that owns expert `{expert}`.

Built-in presets live in `tasks/presets/<name>.json`; `load_preset` also takes a path to a JSON
file in the same format, so a new model family is a new file, not new code.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from ckptflow.tasks.plan.model import PlanError

PLACEHOLDERS = ("layer", "expert")
BUILTIN = {"deepseek-v3": "deepseek_v3.json", "deepseek_v3": "deepseek_v3.json", "llama": "llama.json"}


class Split(Enum):
    COLUMN = "COLUMN"          # dim 0: each rank holds out_features / N rows
    ROW = "ROW"                # dim 1: each rank holds in_features / N columns
    REPLICATED = "REPLICATED"  # whole tensor on every rank
    EXPERT = "EXPERT"          # whole tensor on the rank owning expert {expert}

    @property
    def dim(self) -> int | None:
        return _SPLIT_DIMS.get(self.value)


_SPLIT_DIMS = {"COLUMN": 0, "ROW": 1}


@dataclass(frozen=True)
class Rule:
    pattern: str
    target: str | None         # None: drop the tensor
    split: Split


@dataclass(frozen=True)
class LayerDrop:
    """Drop whole layers `config[first] .. config[first] + config[count] - 1` (DeepSeek's MTP)."""

    prefix: str                # e.g. "model.layers.{layer}." — how a layer's tensors are named
    first: str                 # config key of the first dropped layer index
    count: str                 # config key of how many layers; absent from config = 0


@dataclass(frozen=True)
class Mapped:
    """What the table says about one source name."""

    rule: Rule
    target: str | None
    captures: dict[str, str]


@dataclass(frozen=True)
class Preset:
    name: str
    rules: tuple[Rule, ...]
    output_file: str = "model{rank}-mp{world}.safetensors"
    write_index: bool = False
    copy_files: tuple[str, ...] | None = None
    drop_layers: LayerDrop | None = None
    experts: str | None = None     # config key holding the routed-expert count
    source: str = "<memory>"       # where it was loaded from, for error messages

    def __post_init__(self) -> None:
        # One alternation regex for the whole table: Python tries alternatives left to right,
        # so the first row that matches the whole name wins, in one C-level call per name
        # (DeepSeek-V3 has ~90k tensor names; a Python loop over rows is seconds).
        parts = [f"(?P<r{i}>{_regex(r.pattern, i)})" for i, r in enumerate(self.rules)]
        object.__setattr__(self, "_regex", re.compile("|".join(parts) or r"(?!)"))
        object.__setattr__(self, "_groups", tuple(
            tuple((p, f"r{i}_{p}") for p in PLACEHOLDERS if f"{{{p}}}" in r.pattern)
            for i, r in enumerate(self.rules)))

    def map_name(self, name: str) -> Mapped | None:
        return map_name(self, name)


def _regex(pattern: str, row: int) -> str:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)\}", pattern):
        out.append(re.escape(pattern[pos:m.start()]) + f"(?P<r{row}_{m.group(1)}>\\d+)")
        pos = m.end()
    return "".join(out) + re.escape(pattern[pos:])


def map_name(preset: Preset, name: str) -> Mapped | None:
    """The first row matching `name` (target filled in), or None when no row matches."""
    m = preset._regex.fullmatch(name)  # type: ignore[attr-defined]
    if m is None:
        return None
    row = int(m.lastgroup[1:])  # the outer group closes last, so lastgroup is "r<row>"
    rule = preset.rules[row]
    caps = {p: m.group(g) for p, g in preset._groups[row]}  # type: ignore[attr-defined]
    return Mapped(rule, None if rule.target is None else rule.target.format(**caps), caps)


def _fail(source: str, what: str) -> PlanError:
    return PlanError(f"preset {source}: {what}")


def _rule(source: str, i: int, row: Any) -> Rule:
    where = f"rules[{i}] {row!r}"
    if not isinstance(row, list) or len(row) not in (2, 3):
        raise _fail(source, f"{where} must be [pattern, target or null, split]")
    pattern, target = row[0], row[1]
    split_name = row[2] if len(row) == 3 else ("REPLICATED" if target is None else None)
    if not isinstance(pattern, str) or not pattern or not (target is None or isinstance(target, str)):
        raise _fail(source, f"{where}: pattern must be a non-empty string, target a string or null")
    if split_name not in Split.__members__:
        raise _fail(source, f"{where}: split must be one of {', '.join(Split.__members__)}")
    split = Split[split_name]
    used = set(re.findall(r"\{(\w+)\}", pattern))
    if used - set(PLACEHOLDERS) or len(re.findall(r"\{(\w+)\}", pattern)) != len(used):
        raise _fail(source, f"{where}: the pattern may use {{layer}} and {{expert}}, each at most once")
    if target is not None and not set(re.findall(r"\{(\w+)\}", target)) <= used:
        raise _fail(source, f"{where}: the target uses a placeholder its pattern does not capture")
    if split is Split.EXPERT and "expert" not in used:
        raise _fail(source, f"{where}: an EXPERT row needs {{expert}} in its pattern")
    return Rule(pattern, target, split)


def parse_preset(doc: Any, source: str) -> Preset:
    """A `Preset` from a parsed JSON document; every error names `source` and the bad field."""
    known = {"name", "about", "output_file", "write_index", "copy_files", "drop_layers", "experts", "rules"}
    if not isinstance(doc, dict):
        raise _fail(source, "must be a JSON object with a 'rules' list")
    if set(doc) - known:
        raise _fail(source, f"unknown key(s) {sorted(set(doc) - known)}; known: {sorted(known)}")
    if not isinstance(doc.get("rules"), list) or not doc["rules"]:
        raise _fail(source, "'rules' must be a non-empty list of [pattern, target, split]")
    output = doc.get("output_file", "model{rank}-mp{world}.safetensors")
    if not isinstance(output, str) or "{rank}" not in output or not output.endswith(".safetensors") \
            or set(re.findall(r"\{(\w*)\}", output)) - {"rank", "world"}:
        raise _fail(source, f"output_file {output!r} must end in .safetensors, contain {{rank}} "
                            "and use no placeholder but {rank} and {world}")
    copy = doc.get("copy_files")
    if copy is not None and (not isinstance(copy, list) or not all(isinstance(c, str) for c in copy)):
        raise _fail(source, "copy_files must be a list of glob strings (or absent: copy everything)")
    drop = doc.get("drop_layers")
    if drop is not None:
        if not isinstance(drop, dict) or set(drop) != {"prefix", "first", "count"} \
                or not all(isinstance(v, str) for v in drop.values()) or "{layer}" not in drop["prefix"]:
            raise _fail(source, 'drop_layers must be {"prefix": "...{layer}...", "first": <config key>, '
                                '"count": <config key>}')
        drop = LayerDrop(drop["prefix"], drop["first"], drop["count"])
    experts = doc.get("experts")
    if experts is not None and not isinstance(experts, str):
        raise _fail(source, "experts must be the config.json key holding the routed-expert count")
    if not isinstance(doc.get("write_index", False), bool):
        raise _fail(source, "write_index must be true or false")
    rules = tuple(_rule(source, i, row) for i, row in enumerate(doc["rules"]))
    if experts is None and any(r.split is Split.EXPERT for r in rules):
        raise _fail(source, "EXPERT rows need 'experts': the config.json key of the expert count")
    return Preset(str(doc.get("name", Path(source).stem)), rules, output, doc.get("write_index", False),
                  None if copy is None else tuple(copy), drop, experts, source)


def load_preset(name_or_path: str | Path) -> Preset:
    """A built-in preset by name ("deepseek-v3", "llama") or a JSON file in the same format."""
    key = str(name_or_path)
    if key in BUILTIN:
        source = f"tasks/presets/{BUILTIN[key]}"
        text = resources.files("ckptflow.tasks.presets").joinpath(BUILTIN[key]).read_text()
    else:
        path = Path(key)
        if not path.is_file():
            raise PlanError(f"preset {key!r}: no such built-in preset ({', '.join(sorted(BUILTIN))}) "
                            "and no such file; pass a built-in name or a path to a preset JSON file")
        source, text = str(path), path.read_text()
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(source, f"is not valid JSON: {exc}") from None
    return parse_preset(doc, source)
