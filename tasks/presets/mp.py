"""Model-parallel presets: an ordered name-mapping table plus layout options, stored as JSON.

A preset is data (torchtitan / mergekit style): rows `[source pattern, target, split]` where
the pattern may hold `{layer}` and `{expert}` (each matches a run of digits) and `{a|b}` (either
spelling), and the target may reuse the captures (`ckptflow.tasks.presets.patterns`). The first
row whose pattern matches the whole name wins; a `null` target drops the tensor. Split axes are
named by meaning, as in Megatron-Bridge: COLUMN cuts dim 0 (output features), ROW cuts dim 1
(input features), REPLICATED gives every rank the whole tensor, EXPERT gives the whole tensor to
the one rank that owns expert `{expert}`.

Built-in presets are named ("deepseek-v3", "llama"); `load_preset` also takes any fsspec URL or
local path of a JSON file in the same format, so a new model family is a new file, not new code.
A built-in preset lists the config.json `model_type`s it is written for (`model_types`, data like
the rows): `preset_for_config` picks the preset from them, so a Llama is never laid out by the
DeepSeek table because that table was the default.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictStr, ValidationInfo,
                      field_validator, model_validator)

from ckptflow.tasks.presets.patterns import NameMatcher, captures, regex_of, target_fields
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.presets.tables import TableKind, load_table, parse_table

DEFAULT_OUTPUT = "model{rank}-mp{world}.safetensors"
_ROW = "must be [pattern, target or null, split]"
PRESETS = TableKind("preset", {"deepseek-v3": "deepseek_v3.json", "deepseek_v3": "deepseek_v3.json",
                               "llama": "llama.json"}, {
    "": "must be a JSON object with a 'rules' list",
    "rules": "'rules' must be a non-empty list of [pattern, target, split]",
    "rules.pattern": "pattern must be a non-empty string, target a string or null",
    "rules.target": "pattern must be a non-empty string, target a string or null",
    "rules.split": "split must be one of COLUMN, ROW, REPLICATED, EXPERT",
    "name": "name must be a string",
    "about": "about must be a string or a list of strings",
    "output_file": "output_file must be a string ending in .safetensors that contains {rank}",
    "write_index": "write_index must be true or false",
    "copy_files": "copy_files must be a list of glob strings (or absent: copy everything)",
    "drop_layers": 'drop_layers must be {"prefix": "...{layer}...", "first": <config key>, '
                   '"count": <config key>}',
    "experts": "experts must be the config.json key holding the routed-expert count",
    "model_types": "model_types must be a list of config.json model_type strings",
})
FROZEN = ConfigDict(frozen=True, extra="forbid")


class Split(Enum):
    COLUMN = "COLUMN"          # dim 0: each rank holds out_features / N rows
    ROW = "ROW"                # dim 1: each rank holds in_features / N columns
    REPLICATED = "REPLICATED"  # whole tensor on every rank
    EXPERT = "EXPERT"          # whole tensor on the rank owning expert {expert}

    @property
    def dim(self) -> int | None:
        return _SPLIT_DIMS.get(self.value)


_SPLIT_DIMS = {"COLUMN": 0, "ROW": 1}


class Rule(BaseModel):
    """One row: JSON `[pattern, target or null, split]`; a null target may omit the split."""

    model_config = FROZEN
    pattern: StrictStr = Field(min_length=1)
    target: StrictStr | None       # None: drop the tensor
    split: Split

    @model_validator(mode="before")
    @classmethod
    def _from_row(cls, row: Any) -> Any:
        if isinstance(row, dict):  # keyword construction from Python
            return row
        if not isinstance(row, list) or len(row) not in (2, 3):
            raise ValueError(_ROW)
        split = row[2] if len(row) == 3 else ("REPLICATED" if row[1] is None else None)
        return {"pattern": row[0], "target": row[1], "split": split}

    @model_validator(mode="after")
    def _placeholders(self) -> "Rule":
        used = captures(self.pattern)
        if self.target is not None:
            target_fields(self.target, used)
        if self.split is Split.EXPERT and "expert" not in used:
            raise ValueError("an EXPERT row needs {expert} in its pattern")
        return self


class LayerDrop(BaseModel):
    """Drop whole layers `config[first] .. config[first] + config[count] - 1` (DeepSeek's MTP)."""

    model_config = FROZEN
    prefix: StrictStr          # e.g. "model.layers.{layer}." — how a layer's tensors are named
    first: StrictStr           # config key of the first dropped layer index
    count: StrictStr           # config key of how many layers; absent from config = 0

    @field_validator("prefix")
    @classmethod
    def _has_layer(cls, prefix: str) -> str:
        if "layer" not in captures(prefix):
            raise ValueError(PRESETS.fixes["drop_layers"])
        return prefix

    @cached_property
    def prefix_regex(self) -> re.Pattern[str]:
        return re.compile(regex_of(self.prefix))

    def layer_of(self, name: str) -> int | None:
        """The layer index of `name` if it starts with `prefix`, else None."""
        m = self.prefix_regex.match(name)
        return None if m is None else int(m.group("layer"))


@dataclass(frozen=True)
class Mapped:
    """What the table says about one source name."""

    rule: Rule
    target: str | None
    captures: dict[str, str]


class Preset(BaseModel):
    model_config = FROZEN
    name: StrictStr
    about: StrictStr | tuple[StrictStr, ...] | None = None
    output_file: StrictStr = DEFAULT_OUTPUT
    write_index: StrictBool = False
    copy_files: tuple[StrictStr, ...] | None = None
    drop_layers: LayerDrop | None = None
    experts: StrictStr | None = None     # config key holding the routed-expert count
    model_types: tuple[StrictStr, ...] = ()  # config.json model_types this preset is written for
    rules: tuple[Rule, ...] = Field(min_length=1)
    _source: str = PrivateAttr("<memory>")   # where it was loaded from, for error messages

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, doc: Any, info: ValidationInfo) -> Any:
        if isinstance(doc, dict) and "name" not in doc and info.context:
            return {"name": Path(info.context["source"]).stem, **doc}
        return doc

    @field_validator("output_file")
    @classmethod
    def _output_file(cls, output: str) -> str:
        if "{rank}" not in output or not output.endswith(".safetensors") \
                or set(re.findall(r"\{(\w*)\}", output)) - {"rank", "world"}:
            raise ValueError(f"output_file {output!r} must end in .safetensors, contain {{rank}} "
                             "and use no placeholder but {rank} and {world}")
        return output

    @model_validator(mode="after")
    def _experts_named(self) -> "Preset":
        if self.experts is None and any(r.split is Split.EXPERT for r in self.rules):
            raise ValueError("EXPERT rows need 'experts': the config.json key of the expert count")
        return self

    def model_post_init(self, context: Any) -> None:
        if context:
            self._source = context["source"]
        self.matcher  # compiled once, now

    @cached_property
    def matcher(self) -> NameMatcher:
        # a cached_property, not a PrivateAttr: map_name reads it once per tensor name, and a
        # private attribute costs a __getattr__ call (~3 us; DeepSeek-V3 has ~90k names)
        return NameMatcher([r.pattern for r in self.rules])

    @property
    def source(self) -> str:
        """The built-in name or the URL it came from."""
        return self._source


def map_name(preset: Preset, name: str) -> Mapped | None:
    """The first row matching `name` (target filled in), or None when no row matches."""
    hit = preset.matcher.match(name)
    if hit is None:
        return None
    rule = preset.rules[hit[0]]
    return Mapped(rule, None if rule.target is None else rule.target.format(**hit[1]), hit[1])


def builtin_preset_names() -> tuple[str, ...]:
    """The canonical names of the built-in presets ("deepseek-v3", "llama"), aliases left out."""
    return tuple(dict.fromkeys(PRESETS.canonical(n) for n in PRESETS.builtins))


@lru_cache(maxsize=None)
def builtin_presets() -> tuple[Preset, ...]:
    """Every built-in preset, parsed once (choosing one and suggesting one both read them all)."""
    return tuple(load_preset(n) for n in builtin_preset_names())


def _choices() -> str:
    return "; ".join(f"--preset {p.name} (model_type {', '.join(p.model_types) or 'none'})"
                     for p in builtin_presets())


def preset_for_config(config: dict[str, Any] | None) -> str:
    """The built-in preset written for config.json's `model_type`; a `PlanError` listing the presets
    when there is no model_type or no preset claims it. Explicit on purpose: a guessed table
    renames or drops real weights."""
    model_type = (config or {}).get("model_type")
    for preset in builtin_presets():
        if model_type in preset.model_types:
            return preset.name
    said = "config.json has no model_type" if not isinstance(model_type, str) or not model_type else \
        f"config.json's model_type {model_type!r} has no built-in MP preset"
    raise PlanError(f"{said}, so the --mp name table cannot be chosen; pass {_choices()}; or --preset FILE|URL "
                    "for a table of your own")


def parse_preset(doc: Any, source: str) -> Preset:
    """A `Preset` from a parsed JSON document; every error names `source`, the row and the fix."""
    return parse_table(PRESETS, Preset, doc, PRESETS.label(source), source=source)


def load_preset(name_or_url: str | Path, storage_options: dict[str, Any] | None = None) -> Preset:
    """A built-in preset by name ("deepseek-v3", "llama") or a JSON file at any fsspec URL or path."""
    return load_table(PRESETS, Preset, str(name_or_url), storage_options)


__all__ = ["PRESETS", "LayerDrop", "Mapped", "Preset", "Rule", "Split", "builtin_preset_names",
           "builtin_presets", "load_preset", "map_name", "parse_preset", "preset_for_config"]
