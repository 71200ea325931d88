"""`ckptflow megatron`: a Megatron-Core (torch_dist, mp_rank_*) or Megatron-LM GPT-2 checkpoint to Hugging Face."""
from __future__ import annotations

import argparse

from ckptflow.flows.cli.convert import refuse_overlap_early
from ckptflow.flows.cli.output import print_json, text_out
from ckptflow.flows.runtime.process import Runtime
from ckptflow.flows.summary_text import human


def cmd_megatron(args: argparse.Namespace, runtime: Runtime) -> int:
    from ckptflow.storage.urls import parse_storage_options

    opts = parse_storage_options(args.storage_options) or None
    refuse_overlap_early(args.source, args.dest, args.work, opts or {})
    from ckptflow.flows.cli.megatron_core import refuse_core_only_flags, run_megatron_core
    from ckptflow.tasks.mcore.source import is_megatron_core

    if is_megatron_core(args.source, opts):
        return run_megatron_core(args, runtime, human, text_out, print_json)
    refuse_core_only_flags(args)
    from ckptflow.tasks.megatron.preflight import megatron_preflight

    megatron_preflight(args.source, args.config, opts, args.table)  # bombs and bad shapes: before Prefect is imported
    from ckptflow.flows.megatron import megatron_flow
    from ckptflow.flows.cli.run_link import linked

    server = runtime.server
    server.prestart(temporary=runtime.owns_process)  # deaf to the terminal's Ctrl-C (flows/runtime/server.py)
    server.ready()
    summary = runtime.call(linked(megatron_flow, server), source=args.source, dest=args.dest, tokenizer=args.tokenizer,
                           config=args.config, table=args.table, max_shard_size=args.max_shard_size,
                           work=args.work, storage_options=parse_storage_options(args.storage_options) or None,
                           runtime=runtime)
    out = text_out(args)
    print(f"output:   {summary['dest']}  (GPT2LMHeadModel, from TP={summary['tp']}, "
          f"checkpoint_version {summary['checkpoint_version']})", file=out)
    print(f"shards:   {summary['shards']}, tensors: {summary['tensors']}, bytes: {human(summary['bytes_written'])}",
          file=out)
    print("dtypes:   " + ", ".join(f"{k}×{v}" for k, v in summary["dtypes"].items()), file=out)
    if args.json:
        print_json(summary)
    return 0
