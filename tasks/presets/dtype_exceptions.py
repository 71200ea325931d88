"""Tensors that are float32 by design whatever config.json's `torch_dtype` says, per model type.

`verify dtypes` must not call DeepSeek-V3's `e_score_correction_bias` (float32 in a bfloat16
checkpoint, on purpose) a mismatch, nor `--fix-dtypes` cast it. The table maps a config
`model_type` to regexes on tensor names (`re.search`); keys starting with `_` are comments.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from pydantic import ConfigDict, RootModel, StrictStr, field_validator

from ckptflow.tasks.presets.tables import TableKind, load_table

DTYPE_EXCEPTIONS = TableKind("dtype-exceptions table", {"default": "dtype_exceptions.json"}, {
    "": "must be a JSON object: config model_type -> list of regexes on tensor names",
})


class DtypeExceptions(RootModel[dict[str, tuple[StrictStr, ...]]]):
    model_config = ConfigDict(frozen=True)

    @field_validator("root", mode="before")
    @classmethod
    def _no_comments(cls, doc: Any) -> Any:
        return {k: v for k, v in doc.items() if not k.startswith("_")} if isinstance(doc, dict) else doc

    @field_validator("root")
    @classmethod
    def _regexes(cls, table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        for model_type, patterns in table.items():
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{model_type}: {pattern!r} is not a valid regex: {exc}") from None
        return table

    def allowed_f32(self, model_type: str) -> tuple[str, ...]:
        """Regexes of the tensors of `model_type` that are float32 by design."""
        return self.root.get(model_type, ())


@lru_cache(maxsize=1)
def builtin_dtype_exceptions() -> DtypeExceptions:
    return load_table(DTYPE_EXCEPTIONS, DtypeExceptions, "default")
