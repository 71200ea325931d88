"""The fused-groups table of `reindex`: tensors that inference engines load as one fused tensor.

Each row is a name, a Python regex (matched with `re.search`) and the named capture(s) that
identify one instance; tensors whose key captures agree form one group, which `reindex` puts in
one file. The built-in table covers q/k/v, gate/up, MLA's q_a + kv_a and w1/w3; a user's file
(any fsspec URL or path, `--fused-groups`) replaces it. Keys starting with `_` are comments.
"""
from __future__ import annotations

import re
from functools import cached_property
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

from ckptflow.tasks.presets.tables import TableKind, load_table

FUSED_GROUPS = TableKind("fused-groups table", {"default": "fused_groups.json"}, {
    "": 'expected an object {"groups": [{"name", "pattern", "key"}, …]}',
    "groups": '"groups" must be a list of objects {"name", "pattern", "key"}',
    "groups.name": "'name' must be a non-empty string used once",
    "groups.pattern": "'pattern' must be a non-empty regex string",
    "groups.key": "'key' must be a capture name or a list of them",
})


def _no_comments(doc: Any) -> Any:
    return {k: v for k, v in doc.items() if not k.startswith("_")} if isinstance(doc, dict) else doc


class FusedGroup(BaseModel):
    """One row of the table: tensors whose `key` captures agree form one group."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: StrictStr = Field(min_length=1)
    pattern: StrictStr = Field(min_length=1)
    key: tuple[StrictStr, ...] | None = None   # None: every named capture but 'member'

    @model_validator(mode="before")
    @classmethod
    def _comments(cls, doc: Any) -> Any:
        return _no_comments(doc)

    @field_validator("key", mode="before")
    @classmethod
    def _one_or_more(cls, key: Any) -> Any:
        return [key] if isinstance(key, str) else key

    @model_validator(mode="after")
    def _compile(self) -> "FusedGroup":
        try:
            self.regex
        except re.error as exc:
            raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {exc}") from None
        if missing := [k for k in self.keys if k not in self.regex.groupindex]:
            raise ValueError(f"key {missing} is not a named capture of {self.pattern!r} "
                             f"(it has {list(self.regex.groupindex)}); write (?P<{missing[0]}>…) in the pattern")
        return self

    # cached_property, not PrivateAttr: id_of runs per tensor and group (a private attribute
    # costs a __getattr__ call each time)
    @cached_property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)

    @cached_property
    def keys(self) -> tuple[str, ...]:
        """`key`, or its default: every named capture but 'member'."""
        return tuple(c for c in self.regex.groupindex if c != "member") if self.key is None else self.key

    def id_of(self, tensor: str) -> str | None:
        m = self.regex.search(tensor)
        return None if m is None else self.name + ":" + "|".join(m.group(k) or "" for k in self.keys)


class FusedGroups(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    groups: tuple[FusedGroup, ...]

    @model_validator(mode="before")
    @classmethod
    def _comments(cls, doc: Any) -> Any:
        return _no_comments(doc)

    @model_validator(mode="after")
    def _names_once(self) -> "FusedGroups":
        first: dict[str, int] = {}
        for i, g in enumerate(self.groups):
            if g.name in first:
                raise ValueError(f"groups[{i}]: 'name' must be a non-empty string used once; {g.name!r} "
                                 f"already names groups[{first[g.name]}]")
            first[g.name] = i
        return self


def group_of(name: str, groups: list[FusedGroup] | tuple[FusedGroup, ...]) -> str | None:
    """The group id of tensor `name` (first matching row wins), or None if it is in no group."""
    for g in groups:
        gid = g.id_of(name)
        if gid is not None:
            return gid
    return None


def load_fused_groups(url: str | None = None, storage_options: dict[str, Any] | None = None) -> list[FusedGroup]:
    """The fused-groups table at `url` (any fsspec URL or local path); None → the built-in one."""
    return list(load_table(FUSED_GROUPS, FusedGroups, url or "default", storage_options).groups)
