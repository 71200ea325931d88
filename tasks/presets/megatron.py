"""The Megatron → GPT-2 table: which flattened Megatron name becomes which GPT-2 tensor, and how.

Rows are objects `{"source", "target", "tp", "qkv", "transpose", "vocab", "optional"}`; the source
pattern uses the shared placeholder language (`{layer}`, `{expert}`, `{a|b}`; see
`ckptflow.tasks.presets.patterns`), and the first row matching the whole name wins. The table
also holds the GPT-2 config defaults, which config keys come from which Megatron args, and the
args values GPT-2 cannot represent. The built-in one (`gpt2`) covers legacy Megatron-LM GPT-2;
`ckptflow megatron --table FILE|URL` takes another in the same format.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictStr, field_validator, model_validator

from ckptflow.tasks.presets.patterns import captures, target_fields
from ckptflow.tasks.presets.tables import RuleTable, TableKind, load_table, no_comments, parse_table

TP_MODES = ("COLUMN", "ROW", "REPLICATED")  # COLUMN: split on dim 0, ROW: dim 1, REPLICATED: whole
_FLAGS = "'qkv', 'transpose', 'vocab' and 'optional' must be true or false (or absent: false)"
MEGATRON_TABLES = TableKind("Megatron table", {"gpt2": "megatron_gpt2.json"}, {
    "": "must be a JSON object with a 'rules' list",
    "rules": "'rules' must be a non-empty list of objects {\"source\", \"target\", \"tp\", …}",
    "rules.source": "'source' must be a non-empty pattern over flattened Megatron names",
    "rules.target": "'target' must be a GPT-2 tensor name, or null to drop the tensor",
    "rules.tp": f"'tp' must be one of {', '.join(TP_MODES)}",
    **{f"rules.{flag}": _FLAGS for flag in ("qkv", "transpose", "vocab", "optional")},
    "name": "name must be a string",
    "about": "about must be a string or a list of strings",
    "config_defaults": "config_defaults must be an object of GPT-2 config.json values",
    "config_from_args": "config_from_args must map GPT-2 config keys to Megatron args attribute names",
    "unsupported_args": "unsupported_args must map Megatron args attributes to lists of values GPT-2 "
                        "cannot represent",
})


class MegatronRule(BaseModel):
    """One row of the Megatron table."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: StrictStr = Field(min_length=1)  # pattern over flattened Megatron names
    target: StrictStr | None = None          # GPT-2 name ({layer} filled in); None drops the tensor
    tp: Literal["COLUMN", "ROW", "REPLICATED"]
    qkv: StrictBool = False                  # fused query_key_value rows: reorder by checkpoint_version
    transpose: StrictBool = False            # Megatron Linear [out, in] → GPT-2 Conv1D [in, out]
    vocab: StrictBool = False                # cut Megatron's vocab padding to config vocab_size rows
    optional: StrictBool = False             # absent from some checkpoints (lm_head: only when untied)

    @model_validator(mode="after")
    def _placeholders(self) -> "MegatronRule":
        used = captures(self.source)
        if self.target is not None:
            target_fields(self.target, used)
        if self.qkv and self.tp != "COLUMN":
            raise ValueError("a qkv row must be tp COLUMN: each rank holds whole heads of q, k and v")
        return self


class MegatronTable(RuleTable):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: StrictStr | None = None
    about: StrictStr | tuple[StrictStr, ...] | None = None
    rules: tuple[MegatronRule, ...] = Field(min_length=1)
    config_defaults: dict[str, Any] = {}
    config_from_args: dict[str, StrictStr] = {}
    unsupported_args: dict[str, tuple[Any, ...]] = {}
    _label: str = PrivateAttr("Megatron table <memory>")

    @field_validator("config_defaults", "config_from_args", "unsupported_args", mode="before")
    @classmethod
    def _sections(cls, section: Any) -> Any:
        return no_comments(section)  # '_about' keys are comments

    def match(self, name: str) -> tuple[MegatronRule, str | None, int | None] | None:
        """(rule, GPT-2 target, layer) of the first row matching `name`, or None."""
        hit = self.first_row(name)
        if hit is None:
            return None
        rule, caps = hit
        return rule, None if rule.target is None else rule.target.format(**caps), caps.get("layer")


def load_megatron_table(url: str | None = None, storage_options: dict[str, Any] | None = None) -> MegatronTable:
    """The built-in table (None or "gpt2"), or a JSON file in the same format at any URL or path."""
    return load_table(MEGATRON_TABLES, MegatronTable, url or "gpt2", storage_options)


def parse_megatron_table(doc: Any, source: str) -> MegatronTable:
    return parse_table(MEGATRON_TABLES, MegatronTable, doc, MEGATRON_TABLES.label(source))
