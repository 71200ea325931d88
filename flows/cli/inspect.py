"""`ckptflow inspect SOURCE`: what `--dequant` would do, from headers and config files alone;
with `--quantize SCHEME`, also what `convert --quantize SCHEME` would write.

Per group of tensors: the detected scheme with its geometry and scale dtypes, bytes in, bytes
`--dequant` would write; what is dropped (activation / KV scales) and what would be refused.
It reads what `validate` reads (one range read per shard header) and never a tensor.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from ckptflow.storage.checkpoint import Checkpoint
from ckptflow.tasks.plan.model import PlanError

from ckptflow.flows.printable import printable


def _geometry(params: tuple[tuple[str, Any], ...]) -> str:
    """How a scheme's scales cover its weight, from the plan's params (any transform's)."""
    p = dict(params)
    if "per" in p:
        return f"per-{p['per']}"
    if "block" in p:
        bm, bn = p["block"]
        return f"block {bm}x{bn}"
    if "group" in p:
        return f"groups of {p['group']}" + (f", {p['convention']} convention" if "convention" in p else "")
    return ", ".join(f"{k} {v}" for k, v in p.items()) or "-"  # a format whose params say otherwise


def inspect_report(ckpt: Checkpoint) -> dict[str, Any]:
    """The report as plain data (what `--json` prints)."""
    from ckptflow.tasks.planners.quant_layout import detect

    tensors = ckpt.tensors()
    report: dict[str, Any] = {
        "source": ckpt.url, "files": len(ckpt.weight_files), "tensors": len(tensors),
        "bytes_in": sum(i.nbytes for _, i in tensors.values()), "scheme": None, "groups": [],
        "copied": {"tensors": 0, "bytes": 0}, "dropped": [], "refused": [], "dequant_bytes_out": None,
    }
    try:
        layout = detect(ckpt)
    except PlanError as exc:  # the config names a scheme ckptflow does not know
        report["refused"] = [str(exc)]
        return report
    if layout.scheme is not None:
        report["scheme"] = {"method": layout.scheme.method, "declared_in": layout.scheme.where}
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for q in layout.quantized.values():
        key = (q.variant.scheme.name, _geometry(q.params), q.main[1].dtype,
               "+".join(a[1].dtype for a in q.aux))
        g = groups.setdefault(key, {"scheme": key[0], "geometry": key[1], "codes_dtype": key[2],
                                    "scale_dtypes": key[3], "tensors": 0, "bytes_in": 0, "bytes_out": 0,
                                    "example": q.main[1].name})
        g["tensors"] += 1
        g["bytes_in"] += q.main[1].nbytes + sum(a[1].nbytes for a in q.aux)
        g["bytes_out"] += 2 * _numel(q.out_shape)
    report["groups"] = sorted(groups.values(), key=lambda g: -g["bytes_in"])
    folded = layout.consumed | set(layout.activations) | set(layout.quantized)
    plain = [i for n, (_, i) in tensors.items() if n not in folded]
    report["copied"] = {"tensors": len(plain), "bytes": sum(i.nbytes for i in plain)}
    report["dropped"] = sorted(layout.activations)
    report["refused"] = list(layout.problems)
    if not layout.problems and layout.quantized:  # what plan_dequant's shards would total
        report["dequant_bytes_out"] = report["copied"]["bytes"] + sum(g["bytes_out"] for g in groups.values())
    return report


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def print_report(r: dict[str, Any], human: Any, out: Any = None) -> None:
    out = out or sys.stdout  # looked up per call: a captured or redirected stdout is honoured
    print(f"{printable(r['source'])}: {r['files']} file(s), {r['tensors']} tensors, {human(r['bytes_in'])}", file=out)
    s = r["scheme"]
    print(f"scheme:   {s['method']} (from {s['declared_in']})" if s else "scheme:   none declared", file=out)
    for g in r["groups"]:
        print(f"  {g['scheme']:<15} {g['geometry']:<22} {g['codes_dtype']} + {g['scale_dtypes']:<16} "
              f"{g['tensors']:>6} tensors  {human(g['bytes_in'])} → {human(g['bytes_out'])} BF16  "
              f"(e.g. {printable(g['example'])})", file=out)
    print(f"copied:   {r['copied']['tensors']} tensors, {human(r['copied']['bytes'])}", file=out)
    if r["dropped"]:
        names = ", ".join(printable(n) for n in r["dropped"][:5]) + (", …" if len(r["dropped"]) > 5 else "")
        print(f"dropped:  {len(r['dropped'])} activation/KV-cache scale(s): {names}", file=out)
    if r["refused"]:
        print(f"refused:  --dequant would stop before writing ({len(r['refused'])} problem(s)):", file=out)
        for p in r["refused"][:50]:
            print(f"  - {printable(p)}", file=out)
    elif r["dequant_bytes_out"] is not None:
        print(f"--dequant would write {human(r['dequant_bytes_out'])}", file=out)
    else:
        print("--dequant: nothing quantized to convert", file=out)


def quantize_report(ckpt: Checkpoint, scheme: str, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """What `convert --quantize SCHEME [--ignore …]` would write, planned as convert plans it
    (`plan_passes`, with `--dequant` in front when the source is quantized) and summarised as its
    dry run summarises it (`quant_summary.written_scheme`). Weights whose columns the scheme cannot
    take are named in `refused`; the rest is planned as if they were --ignore'd, so one look shows
    every problem and what the scheme would write once they are left out."""
    from ckptflow.flows.params import Recipe
    from ckptflow.flows.recipe import plan_passes
    from ckptflow.tasks.plan.compose import planned_checkpoint
    from ckptflow.tasks.planners.dequant import plan_dequant
    from ckptflow.tasks.planners.quant_summary import written_scheme
    from ckptflow.tasks.planners.quant_targets import ignore_matcher, is_target, quant_scheme
    from ckptflow.tasks.planners.quantize import is_quantized

    qs = quant_scheme(scheme)
    dequant = is_quantized(ckpt)
    report: dict[str, Any] = {"scheme": scheme, "after_dequant": dequant, "written": None, "refused": []}
    try:
        upstream = plan_dequant(ckpt) if dequant else None
        source = planned_checkpoint(upstream, ckpt.url, ckpt) if upstream is not None else ckpt
        matcher = ignore_matcher(ignore or None)
        misfits = sorted((n, f, i.shape) for n, (f, i) in source.tensors().items()
                         if is_target(n, i.dtype, i.shape, matcher) and not qs.fits(i.shape))
        left_out = tuple(n.removesuffix(".weight") for n, _, _ in misfits)
        recipe = Recipe(dequant=dequant, quantize=scheme, ignore=(*ignore, *left_out) or None)
        passes, _ = plan_passes(ckpt, recipe)
    except PlanError as exc:  # what convert would stop on (a bad --ignore pattern, a dtype mismatch, …)
        report["refused"] = [str(exc)]
        return report
    report["written"] = written_scheme(passes[-1].plan, ignore or None, refused=left_out)
    report["refused"] = [f"{f}: tensor {n!r} {list(shape)}: {shape[-1]} columns are not a multiple of "
                         f"{qs.col_multiple}; leave it out with --ignore {n.removesuffix('.weight')}"
                         for n, f, shape in misfits]
    return report


def print_quantize(q: dict[str, Any], out: Any = None) -> None:
    from ckptflow.flows.dry_run import print_written_scheme

    out = out or sys.stdout

    if q["after_dequant"]:
        print(f"--quantize {q['scheme']}: the source is quantized; planned after --dequant", file=out)
    if q["written"] is not None:
        print_written_scheme(q["written"], out, detail=True)
    if q["refused"]:
        print(f"refused:  --quantize {q['scheme']} would stop before writing ({len(q['refused'])} problem(s)):",
              file=out)
        for p in q["refused"][:50]:
            print(f"  - {printable(p)}", file=out)


def cmd_inspect(args: Any, runtime: Any = None) -> int:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.flows.cli.megatron_core import inspect_megatron_core
    from ckptflow.tasks.mcore.source import is_megatron_core
    from ckptflow.flows.summary_text import human
    from ckptflow.storage.urls import open_location, parse_storage_options

    if args.ignore and not args.quantize:
        raise PlanError("--ignore only applies with --quantize SCHEME; add --quantize, or drop --ignore")
    if is_megatron_core(args.source, parse_storage_options(args.storage_options) or None):
        return inspect_megatron_core(args, human)
    ckpt = scan_checkpoint(open_location(args.source, parse_storage_options(args.storage_options)))
    report = inspect_report(ckpt)
    if args.quantize:
        report["quantize"] = quantize_report(ckpt, args.quantize, tuple(args.ignore or ()))
    if args.json:
        print(json.dumps(report))
    else:
        print_report(report, human)
        if args.quantize:
            print_quantize(report["quantize"])
    return 1 if report["refused"] or (args.quantize and report["quantize"]["refused"]) else 0
