"""`ckptflow megatron SOURCE DEST` for Megatron-Core checkpoints (torch_dist or legacy mp_rank_*).

Found by layout (`is_megatron_core`): a torch_dist iteration folder, or legacy rank files whose keys
are Megatron-Core's (`decoder.` / `embedding.`); anything else goes down the GPT-2 path as before.
Everything is planned from the index (`read_mcore_index`: `.metadata` / zip directories, never
tensor bytes) before DEST is touched: `plan_megatron_core` is what the CLI's pre-flight, `--dry-run`
and `inspect` call, without Prefect. The flow then hands the plan to the engine (one journaled
shard task per output shard, resumable) and copies tokenizer files last.
"""
from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from ckptflow.storage.errors import UserError
from ckptflow.storage.files import read_json
from ckptflow.storage.overlap import refuse_overlap
from ckptflow.storage.urls import StorageError, open_location
from ckptflow.tasks.mcore.hf_config import tokenizer_vocab_size
from ckptflow.tasks.mcore.index import McoreIndex
from ckptflow.tasks.mcore.plan import McorePlan, plan_mcore, plan_summary, source_checkpoint
from ckptflow.tasks.plan.sizes import parse_size
from ckptflow.tasks.presets.mcore import pick_table
from ckptflow.tasks.run.engine import EngineHooks, EnginePass, run_conversion

from ckptflow.flows import interrupt
from ckptflow.flows.dead_runs import mark_crashed, owner_record
from ckptflow.flows.passes import PrefectSubmitter
from ckptflow.flows.report import RunProgress, publish_dtype_report, publish_summary
from ckptflow.flows.workdir import default_work

MCORE_PREFIXES = ("decoder.", "embedding.", "output_layer.")


def is_megatron_core(source: str, storage_options: dict[str, Any] | None = None) -> bool:
    """A Megatron-Core save by its layout: torch_dist files, or legacy rank files holding
    Megatron-Core keys (GPT-2's legacy saves look the same on disk but hold `language_model.…`)."""
    from ckptflow.tasks.mcore.legacy import scan_rank_file
    from ckptflow.tasks.mcore.locate import find_checkpoint

    try:
        found = find_checkpoint(open_location(source, storage_options))
    except (UserError, OSError, ValueError):
        return False  # not a Megatron save root or iteration folder: the GPT-2 path says what it is
    if found.format == "torch_dist":
        return True
    first = sorted(n for n in found.files if n.endswith("model_optim_rng.pt"))[:1]
    if not first:
        return False
    try:
        keys = scan_rank_file(found.loc, first[0], found.files[first[0]])[0]
    except (UserError, OSError, ValueError):
        return False
    return any(k.startswith(MCORE_PREFIXES) for k in keys)


def _tokenizer_vocab(tokenizer: str | None, storage_options: dict[str, Any] | None) -> int | None:
    if not tokenizer:
        return None
    tok = open_location(tokenizer, storage_options)
    if not tok.fs.exists(tok.path("tokenizer.json")):
        return None
    return tokenizer_vocab_size(read_json(tok, "tokenizer.json"))


def plan_megatron_core(source: str, config: str | None = None, tokenizer: str | None = None,
                       family: str | None = None, table: str | None = None, max_shard_size: str | int = "5GB",
                       storage_options: dict[str, Any] | None = None) -> tuple[McoreIndex, McorePlan]:
    """Read the index and plan every output shard; raises a UserError naming the key, file or args."""
    from ckptflow.tasks.mcore.reader import read_mcore_index

    override = read_json(open_location(config, storage_options), "") if config else None
    if override is not None and not isinstance(override, dict):
        raise StorageError(f"--config {config}: must be a JSON object of config.json values")
    index = read_mcore_index(source, storage_options)
    mapping = pick_table(index.args, family, table, storage_options)
    mp = plan_mcore(index, mapping, parse_size(max_shard_size), override,
                    _tokenizer_vocab(tokenizer, storage_options))
    return index, mp


def describe(summary: dict[str, Any], human: Any) -> list[str]:
    """The plan as a person reads it (dry run, inspect)."""
    it = summary["iteration"]
    lines = [f"source:   Megatron-Core {summary['source_format']}"
             f"{'' if it is None else f', iteration {it}'}, TP={summary['tp']} PP={summary['pp']} "
             f"EP={summary['ep']}: {summary['source_tensors']} tensors in {summary['source_files']} file(s), "
             f"{human(summary['checkpoint_bytes'])}",
             f"family:   {summary['family']} ({', '.join(summary['architectures'])}; {summary['table']}), "
             f"vocab {summary['vocab_size']}, {'tied' if summary['tie_word_embeddings'] else 'untied'} "
             f"output layer, {summary['torch_dtype']}",
             f"output:   {summary['tensors']} tensors, {human(summary['output_bytes'])} in {summary['shards']} "
             f"shard(s); reads {human(summary['read_bytes'])}"]
    lines += [f"  {s['file']}: {s['tensors']} tensors, {human(s['bytes'])}" for s in summary["shard_files"][:20]]
    if summary["shards"] > 20:
        lines.append(f"  … and {summary['shards'] - 20} more shards")
    return lines


@flow(name="ckptflow-megatron-core", task_runner=ThreadPoolTaskRunner(max_workers=1))
def megatron_core_flow(source: str, dest: str, tokenizer: str | None = None, config: str | None = None,
                       family: str | None = None, table: str | None = None, max_shard_size: str = "5GB",
                       work: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a Megatron-Core checkpoint into a Hugging Face one (shards by size, journaled)."""
    from ckptflow.flows.megatron import _copy_tokenizer

    interrupt.rearm()  # Prefect installed its SIGTERM handler as this run started; the CLI's goes back
    logger = get_run_logger()
    t0 = time.perf_counter()
    work = work or default_work(dest)
    src_root, dst = open_location(source, storage_options), open_location(dest, storage_options)
    refuse_overlap(("SOURCE", src_root), ("DEST", dst), ("--work", open_location(work, storage_options)))
    index, mp = plan_megatron_core(source, config, tokenizer, family, table, max_shard_size, storage_options)
    src = open_location(index.root, storage_options)  # the iteration folder: chunk files are relative to it
    ckpt = source_checkpoint(index, mp.plan, src)
    progress = RunProgress(len(mp.plan.shards), mp.plan.total_size)
    hooks = EngineHooks(on_commit=progress.shard_committed, on_dtype_report=publish_dtype_report,
                        lock_owner=owner_record(), on_takeover=mark_crashed)
    result = run_conversion(ckpt, [EnginePass(mp.plan)], src, dst, work, storage_options,
                            submitter=PrefectSubmitter(work, storage_options), protected=(src_root,), hooks=hooks)
    if tokenizer:
        logger.info("copied tokenizer files: %s", ", ".join(_copy_tokenizer(tokenizer, dst, storage_options)))
    records = result.records
    fresh = [r for r in records if not r["cached"]]
    shard_s = round(sum(r.get("seconds", 0.0) for r in fresh), 3)
    read = sum(r.get("source_bytes", 0) for r in fresh)
    summary = {"stage": "megatron-core", "source": source, "dest": dest, "work": work, **plan_summary(index, mp),
               "cached_shards": len(records) - len(fresh), "source_bytes": read,
               "bytes_written": sum(r.get("size", 0) for r in fresh), "shard_seconds": shard_s,
               "gb_per_s_in": round(read / shard_s / 1e9, 3) if shard_s else None,
               "dtypes": {r["dtype"]: r["tensors"] for r in result.report.rows()},
               "seconds": round(time.perf_counter() - t0, 3), "records": records}
    publish_summary(summary)
    return summary


def run_megatron_core(args: Any, human: Any, text_out: Any, print_json: Any) -> int:
    """The CLI's `megatron` command for a Megatron-Core SOURCE: plan (errors before Prefect starts),
    then a dry run's report or the flow."""
    import json

    from ckptflow.storage.urls import parse_storage_options

    opts = parse_storage_options(args.storage_options) or None
    index, mp = plan_megatron_core(args.source, args.config, args.tokenizer, args.family, args.table,
                                   args.max_shard_size, opts)
    out = text_out(args)
    if args.dry_run:
        summary = {"dry_run": True, "source": args.source, "dest": args.dest, **plan_summary(index, mp)}
        print("\n".join(describe(summary, human)), file=out)
        print("dry run: nothing written", file=out)
        if args.json:
            print(json.dumps(summary))
        return 0
    from ckptflow.flows import server
    from ckptflow.flows.run_link import linked

    server.prestart()  # deaf to the terminal's Ctrl-C (flows/server.py)
    server.ready()
    summary = linked(megatron_core_flow)(source=args.source, dest=args.dest, tokenizer=args.tokenizer,
                                         config=args.config, family=args.family, table=args.table,
                                         max_shard_size=args.max_shard_size, work=args.work, storage_options=opts)
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

    index, mp = plan_megatron_core(args.source, storage_options=parse_storage_options(args.storage_options) or None)
    summary = plan_summary(index, mp)
    print(json.dumps(summary) if args.json else "\n".join(describe(summary, human)))
    return 0
