"""`ckptflow watch`: convert every new or stale checkpoint under a prefix (what a schedule runs)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ckptflow.flows.cli.convert import convert_options, no_stage_chosen
from ckptflow.flows.cli.output import EXIT_USER_ERROR
from ckptflow.flows.printable import printable
from ckptflow.flows.runtime.process import Runtime


def cmd_watch(args: argparse.Namespace, runtime: Runtime) -> int:
    if no_stage_chosen(args):
        return EXIT_USER_ERROR
    from ckptflow.storage.urls import parse_storage_options

    from ckptflow.flows.params import ConvertOptions

    options = ConvertOptions(**convert_options(args))  # before torch and Prefect load
    from ckptflow.storage.overlap import open_watch_prefixes

    opts = parse_storage_options(args.storage_options) or None
    src, dst, work = open_watch_prefixes(args.source_prefix, args.dest_prefix, args.work_prefix,
                                         opts)  # overlap: before Prefect too
    if args.dry_run:  # listings and markers only: no Prefect, no server
        from ckptflow.flows.watch_scan import scan_watch, watch_summary

        warn = lambda text: print(f"warning: {text}", file=sys.stderr)  # noqa: E731
        scan = scan_watch(src, dst, work, options.recipe_key(), args.settle_seconds, warn)
        print_watch(watch_summary(args.source_prefix, args.dest_prefix, scan.plan, True, {}), args.json)
        return 0
    server = runtime.server
    from ckptflow.flows.runtime.runners import prestart_for

    # deaf to the terminal's Ctrl-C (flows/runtime/server.py)
    prestart_for(server, runtime.owns_process, options.task_runner, options.dask_address)
    from ckptflow.flows.cli.run_link import linked
    from ckptflow.flows.watch import WatchFailed, watch_flow

    server.ready()

    try:
        summary = runtime.call(linked(watch_flow, server), source_prefix=args.source_prefix,
                               dest_prefix=args.dest_prefix, options=options, work_prefix=args.work_prefix,
                               max_concurrent=args.max_concurrent, settle_seconds=args.settle_seconds,
                               storage_options=opts, runtime=runtime)
    except WatchFailed as exc:
        print_watch(exc.summary, args.json)  # what did convert is news too
        raise
    print_watch(summary, args.json)
    return 0


def print_watch(summary: dict[str, Any], as_json: bool) -> None:
    out = sys.stderr if as_json else sys.stdout
    for c in summary["checkpoints"]:
        r = c.get("result") or {}
        done = (" → failed" if "error" in r else
                f" → {r['shards']} shards ({r['cached_shards']} reused)" if r else "")
        print(f"{printable(c['name']):<24} {c['action']:<11} {printable(c['reason'])}{done}", file=out)
    if not summary["checkpoints"]:
        print(f"{printable(summary['source_prefix'])}: no checkpoints found (folders holding *.safetensors)",
              file=out)
    if as_json:
        print(json.dumps(summary))
