"""`ckptflow megatron` and `inspect` for a Megatron-Core SOURCE: the plan printed, or the flow run."""
from __future__ import annotations

from typing import Any

from ckptflow.storage.errors import UserError
from ckptflow.tasks.mcore.plan import plan_summary
from ckptflow.tasks.mcore.source import plan_megatron_core, vocab_unknown


def describe(summary: dict[str, Any], human: Any) -> list[str]:
    """The plan as a person reads it (dry run, inspect)."""
    it = summary["iteration"]
    unknown, padded = bool(summary.get("vocab_unknown")), " (padded)" if summary.get("vocab_unknown") else ""
    lines = [f"source:   Megatron-Core {summary['source_format']}"
             f"{'' if it is None else f', iteration {it}'}, TP={summary['tp']} PP={summary['pp']} "
             f"EP={summary['ep']}: {summary['source_tensors']} tensors in {summary['source_files']} file(s), "
             f"{human(summary['checkpoint_bytes'])}",
             f"family:   {summary['family']} ({', '.join(summary['architectures'])}; {summary['table']}), "
             f"vocab {summary['vocab_size']}{padded}, {'tied' if summary['tie_word_embeddings'] else 'untied'} "
             f"output layer, {summary['torch_dtype']}",
             f"output:   {summary['tensors']} tensors, {human(summary['output_bytes'])} in {summary['shards']} "
             f"shard(s); reads {human(summary['read_bytes'])}"]
    if unknown:
        lines.insert(2, f"vocab:    unknown — padded to {summary['vocab_size']}; "
                        "`megatron` needs --tokenizer or --config")
    lines += [f"  {s['file']}: {s['tensors']} tensors, {human(s['bytes'])}" for s in summary["shard_files"][:20]]
    if summary["shards"] > 20:
        lines.append(f"  … and {summary['shards'] - 20} more shards")
    return lines


def run_megatron_core(args: Any, runtime: Any, human: Any, text_out: Any, print_json: Any) -> int:
    """The CLI's `megatron` command for a Megatron-Core SOURCE: plan (errors before Prefect starts),
    then a dry run's report or the flow."""
    import json

    from ckptflow.storage.urls import parse_storage_options

    opts = parse_storage_options(args.storage_options) or None
    asked = (args.source, args.config, args.tokenizer, args.family, args.table, args.max_shard_size, opts)
    index, mp = plan_megatron_core(*asked)
    runtime.plan = (asked, index, mp)  # the flow reuses it (in this process) instead of reading the index again
    out = text_out(args)
    if args.dry_run:
        summary = {"dry_run": True, "source": args.source, "dest": args.dest, **plan_summary(index, mp)}
        print("\n".join(describe(summary, human)), file=out)
        print("dry run: nothing written", file=out)
        if args.json:
            print(json.dumps(summary))
        return 0
    from ckptflow.flows.cli.run_link import linked
    from ckptflow.flows.megatron_core import megatron_core_flow

    server = runtime.server
    server.prestart(temporary=runtime.owns_process)  # deaf to the terminal's Ctrl-C (flows/runtime/server.py)
    server.ready()
    summary = runtime.call(linked(megatron_core_flow, server), source=args.source, dest=args.dest,
                           tokenizer=args.tokenizer, config=args.config, family=args.family, table=args.table,
                           max_shard_size=args.max_shard_size, work=args.work, storage_options=opts,
                           runtime=runtime)
    print("\n".join(describe(summary, human)), file=out)
    print(f"written:  {summary['dest']}  ({summary['shards'] - summary['cached_shards']} shard(s) written, "
          f"{summary['cached_shards']} reused)", file=out)
    print("dtypes:   " + ", ".join(f"{k}×{v}" for k, v in summary["dtypes"].items()), file=out)
    if args.json:
        print_json(summary)
    return 0


def refuse_core_only_flags(args: Any) -> None:
    """`--dry-run` and `--family` mean something only for Megatron-Core saves; on the GPT-2 path a
    dry run that converted anyway would write what the user asked not to write."""
    used = [flag for flag, on in (("--dry-run", args.dry_run), ("--family", args.family)) if on]
    if used:
        raise UserError(f"{args.source}: not a Megatron-Core save (no torch_dist files, no rank files with "
                        f"decoder./embedding. keys), so {' and '.join(used)} do not apply; the Megatron-LM GPT-2 "
                        "path has neither")


def inspect_megatron_core(args: Any, human: Any) -> int:
    """`ckptflow inspect SOURCE` for a Megatron-Core save: the plan `megatron` would run."""
    import json

    from ckptflow.storage.urls import parse_storage_options

    # inspect has no --tokenizer / --config: a save without its true vocab size is shown with the padded one
    index, mp = plan_megatron_core(args.source, storage_options=parse_storage_options(args.storage_options) or None,
                                   allow_unknown_vocab=True)
    summary = {**plan_summary(index, mp), "vocab_unknown": vocab_unknown(index)}
    print(json.dumps(summary) if args.json else "\n".join(describe(summary, human)))
    return 0
