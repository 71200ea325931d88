"""Megatron-Core → Hugging Face tables: which torch_dist key becomes which HF tensor(s), and how.

A table is data (`mcore_<family>.json`); one pure function (`ckptflow.tasks.mcore.mapping`)
applies it to a `McoreIndex`. A row names a source key (the placeholder language of
`ckptflow.tasks.presets.patterns`: `{layer}`/`{expert}` digits in the name, `{a|b}` spellings),
the leading axes of the global tensor that are indices (`stacked`: "layer", "expert"), a generic
split of the remaining rows (`split`, see `SPLITS`) and the target name(s). `null` drops a key.
Every other section says how config.json is made from the saved args. `--family NAME` picks a
built-in table, `--table FILE|URL` reads one in the same format (a family without code), and
without either the family is the one built-in table whose `detect` fits the saved args.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictStr, field_validator, model_validator

from ckptflow.tasks.presets.patterns import captures, target_fields
from ckptflow.tasks.presets.tables import RuleTable, TableError, TableKind, load_table, no_comments, parse_table

# How a row's remaining rows (the dim after the stacked axes) become its targets, in target order:
#   none:   the whole tensor, one target
#   qkv:    per query group, [q heads of the group, k head, v head] rows → q, k, v targets
#   halves: [first half; second half] rows (SwiGLU linear_fc1: [all gate; all up]) → gate, up
SPLITS = {"none": 1, "qkv": 3, "halves": 2}
AXES = ("layer", "expert")
FAMILIES = {"llama": "mcore_llama.json", "qwen2": "mcore_qwen2.json", "qwen3": "mcore_qwen3.json",
            "mixtral": "mcore_mixtral.json", "qwen3_moe": "mcore_qwen3_moe.json",
            "qwen2_moe": "mcore_qwen2_moe.json", "deepseek_v3": "mcore_deepseek_v3.json"}
_FLAGS = "'vocab', 'tied' and 'optional' must be true or false (or absent: false)"
MCORE_TABLES = TableKind("Megatron-Core table", FAMILIES, {
    "": "must be a JSON object with 'model_type', 'architectures' and a 'rules' list",
    "rules": "'rules' must be a non-empty list of objects {\"source\", \"target\" or \"targets\", …}",
    "rules.source": "'source' must be a non-empty pattern over torch_dist keys",
    "rules.stacked": f"'stacked' must list leading axes, each one of {', '.join(AXES)}",
    "rules.split": f"'split' must be one of {', '.join(SPLITS)}",
    "rules.dims": "'dims' must list, per output dim, the config.json key its size must equal, or null",
    **{f"rules.{flag}": _FLAGS for flag in ("vocab", "tied", "optional")},
    "detect": "'detect' must map Megatron args names to true (set and truthy) or false (absent or falsy)",
    "config_from_args": "'config_from_args' must map config.json keys to an args name, '!name' (negated) or a "
                        "list of args names (the first one set wins)",
    "config_defaults": "'config_defaults' must be an object of config.json values",
    "unsupported_args": "'unsupported_args' must map Megatron args names to lists of values this family "
                        "cannot represent",
})


class McoreRule(BaseModel):
    """One row: a torch_dist key (pattern) → one HF tensor, or several through a split."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: StrictStr = Field(min_length=1)
    stacked: tuple[Literal["layer", "expert"], ...] = ()  # leading axes of the global tensor, in order
    split: Literal["none", "qkv", "halves"] = "none"
    target: StrictStr | None = None                       # split none: one target (None drops the key)
    targets: tuple[StrictStr, ...] | None = None          # qkv / halves: one per part, in order
    vocab: StrictBool = False     # rows past the true vocab size are Megatron's padding: never written
    tied: StrictBool = False      # the output layer: not written when the model ties it to the embedding
    optional: StrictBool = False  # may be absent (a tied model has no output_layer)
    dims: tuple[StrictStr | None, ...] | None = None  # config.json key each output dim must equal (None: any)

    @model_validator(mode="after")
    def _shape(self) -> "McoreRule":
        named = captures(self.source)
        if len(set(self.stacked)) != len(self.stacked) or set(self.stacked) & set(named):
            raise ValueError("each of layer / expert may come from the name or from one stacked axis, once")
        outs = self.outputs
        if self.split == "none" and self.targets is not None:
            raise ValueError("a row without a split has one 'target', not 'targets'")
        if self.split != "none" and (self.targets is None or len(self.targets) != SPLITS[self.split]):
            raise ValueError(f"split {self.split} needs 'targets', {SPLITS[self.split]} names in order")
        for t in outs:
            if t is not None:
                target_fields(t, named + self.stacked)
        return self

    @property
    def outputs(self) -> tuple[str | None, ...]:
        return self.targets if self.targets is not None else (self.target,)


class McoreTable(RuleTable):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: StrictStr | None = None
    about: StrictStr | tuple[StrictStr, ...] | None = None
    model_type: StrictStr
    architectures: tuple[StrictStr, ...] = Field(min_length=1)
    experts_key: StrictStr = "num_experts"   # the config.json key that counts routed experts
    detect: dict[str, StrictBool] = {}
    rules: tuple[McoreRule, ...] = Field(min_length=1)
    config_defaults: dict[str, Any] = {}
    config_from_args: dict[str, StrictStr | tuple[StrictStr, ...]] = {}
    unsupported_args: dict[str, tuple[Any, ...]] = {}
    _label: str = PrivateAttr("Megatron-Core table <memory>")

    @field_validator("config_defaults", "config_from_args", "unsupported_args", "detect", mode="before")
    @classmethod
    def _sections(cls, section: Any) -> Any:
        return no_comments(section)  # '_about' keys are comments

    def match(self, key: str) -> tuple[McoreRule, dict[str, int]] | None:
        """(rule, indices captured from the name) of the first row matching `key`, or None."""
        return self.first_row(key)

    def fits(self, args: dict[str, Any]) -> bool:
        return all(bool(args.get(k)) == want for k, want in self.detect.items())


def load_mcore_table(ref: str, storage_options: dict[str, Any] | None = None) -> McoreTable:
    """A built-in family's table by name, or a JSON file in the same format at any URL or path."""
    return load_table(MCORE_TABLES, McoreTable, ref, storage_options)


def parse_mcore_table(doc: Any, source: str) -> McoreTable:
    return parse_table(MCORE_TABLES, McoreTable, doc, MCORE_TABLES.label(source))


def pick_table(args: dict[str, Any], family: str | None = None, table: str | None = None,
               storage_options: dict[str, Any] | None = None) -> McoreTable:
    """`--table` if given, else `--family`'s built-in table, else the one whose `detect` fits `args`."""
    if table is not None:
        return load_mcore_table(table, storage_options)
    if family is not None:
        if family not in FAMILIES:
            raise TableError(f"--family {family}: not a built-in Megatron-Core family ({', '.join(FAMILIES)}); "
                             "pass one of them, or --table FILE|URL")
        return load_mcore_table(family)
    fit = [name for name in FAMILIES if load_mcore_table(name).fits(args)]
    if len(fit) != 1:
        said = ", ".join(f"{k}={args.get(k)!r}" for k in
                         ("num_experts", "qk_layernorm", "add_qkv_bias", "moe_shared_expert_intermediate_size"))
        what = "no built-in family fits" if not fit else f"several families fit ({', '.join(fit)})"
        raise TableError(f"{what} the checkpoint's args ({said}); pass --family "
                         f"{{{','.join(FAMILIES)}}} or --table FILE|URL")
    return load_mcore_table(fit[0])
