"""Names no preset row matches: which built-in preset would match them, and when dropping them is refused.

An unmatched name almost always means the wrong table (a Llama laid out by the DeepSeek-V3
preset matches its q_proj and o_proj but not its k_proj / v_proj), so the error names the
built-in preset(s) that match every tensor instead of only advising `--drop-unmatched`. And
`--drop-unmatched` never drops one member of a fused group (q/k/v, gate/up, …, from the same
table `reindex` uses) while keeping another: a q_proj without its k_proj is never a valid
model, only a file that loads and computes nonsense. Pure: names and config in, text out.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from ckptflow.tasks.presets.fused_groups import FusedGroup
from ckptflow.tasks.presets.mp import Preset, builtin_presets, map_name

MAX_NAMES_LISTED = 20  # in an error; the summary and the dry run list every dropped name


def listed(names: Sequence[str], indent: str = "      ") -> str:
    """One name a line, the first MAX_NAMES_LISTED of them, then how many more."""
    more = len(names) - MAX_NAMES_LISTED
    return "\n".join(f"{indent}{n}" for n in names[:MAX_NAMES_LISTED]) + \
        (f"\n{indent}… and {more} more" if more > 0 else "")


def _layer_dropped(preset: Preset, config: dict[str, Any], name: str) -> bool:
    """Would `preset` drop `name` with its layer (DeepSeek's MTP)? Lenient: only a hint rests on it."""
    drop = preset.drop_layers
    layer = None if drop is None else drop.layer_of(name)
    if drop is None or layer is None:
        return False
    first, count = config.get(drop.first), config.get(drop.count, 0)
    return isinstance(first, int) and isinstance(count, int) and first <= layer < first + count


def covers(preset: Preset, config: dict[str, Any], names: Iterable[str]) -> bool:
    """Does every name map to a row of `preset` (or fall in a layer it drops)?"""
    return all(map_name(preset, n) is not None or _layer_dropped(preset, config, n) for n in names)


def suggestion(names: Sequence[str], config: dict[str, Any] | None, but: str | None = None,
               them: str = "all of them") -> str:
    """'preset llama matches all of them: pass --preset llama', or '' when no built-in preset
    (other than `but`) matches every name."""
    fits = [p.name for p in builtin_presets() if p.name != but and covers(p, config or {}, names)]
    if not fits:
        return ""
    return f"preset {' and '.join(fits)} match{'es' if len(fits) == 1 else ''} {them}: pass --preset {fits[0]}"


def _member(name: str, groups: Sequence[FusedGroup]) -> tuple[str, str] | None:
    """(group id, group row name) of tensor `name`: the first row of the fused-groups table wins."""
    for g in groups:
        gid = g.id_of(name)
        if gid is not None:
            return gid, g.name
    return None


def broken_groups(dropped: Sequence[str], kept: Iterable[str], groups: Sequence[FusedGroup]) -> str | None:
    """One problem line when dropping `dropped` would keep other members of their fused groups (the
    dropped and kept names of the first such group, and how many groups in all), else None."""
    by_group: dict[str, tuple[str, list[str], list[str]]] = {}
    for name in dropped:
        if (m := _member(name, groups)) is not None:
            by_group.setdefault(m[0], (m[1], [], []))[1].append(name)
    if not by_group:
        return None
    for name in kept:
        if (m := _member(name, groups)) is not None and m[0] in by_group:
            by_group[m[0]][2].append(name)
    broken = [(row, d, k) for row, d, k in by_group.values() if k]
    if not broken:
        return None
    row, drop, keep = broken[0]
    return (f"--drop-unmatched refused: it would split {len(broken)} fused group(s), dropping some members and "
            "keeping others, which never makes a valid model (a q_proj kept with its k_proj dropped computes "
            f"nonsense); e.g. fused group {row}: it would drop {', '.join(repr(n) for n in drop)} but keep "
            f"{', '.join(repr(n) for n in keep)}")
