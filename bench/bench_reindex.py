"""Reindex fused groups: ckptflow's planner + executor vs whole-file load/save vs `cp -r`.

The checkpoint (≥ 1 GiB, Qwen-shaped BF16) is laid out the way that breaks locality-based
reindexing: every q_proj in one shard, every k/v in another, all gate_proj in a third, all
up_proj in a fourth. Each contender runs as its own child process, inputs warmed in the page
cache before each run, outputs removed and synced between runs:

  (a) baseline  — the seed-002 way: `load_file` whole shards, move tensors per plan into new
                  dicts, `save_file` (it follows the same plan, so outputs compare tensor for tensor);
  (b) ckptflow  — scan headers, `plan_reindex`, `write_shard` per output shard, index, other
                  files; no Prefect (the CLI adds Prefect's fixed start-up on top);
  (c) cp -r     — the physical floor: the same bytes read and written once;

Local → local, ckptflow's executor copies each tensor with `copy_file_range`, as cp does.

Targets (issue 4): wall ≤ 0.5× baseline, peak RSS ≤ ¼ baseline, wall ≤ 1.5× cp -r.

    python bench/bench_reindex.py [--dir /tmp/ckptflow-bench-reindex] [--gib 1.25] [--repeat 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import mib, run_measured, same_tensors  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000


def qwen_shards(gib: float) -> tuple[list, dict]:
    """Entries per shard for ckptflow.flows.demo.synthetic.write_checkpoint, grouped hostilely, and a config."""
    import torch

    head = HIDDEN // HEADS
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head + 3 * HIDDEN * INTER)
    layers = max(2, round((gib * 2**30 - 4 * VOCAB * HIDDEN) / per_layer))
    g = torch.Generator().manual_seed(0)

    def t(name: str, *shape: int) -> tuple:
        return (name, torch.bfloat16, shape, lambda: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16))

    shards: list[list] = [[t("model.embed_tokens.weight", VOCAB, HIDDEN)], [], [], [], []]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards[0] += [t(p + "self_attn.q_proj.weight", HIDDEN, HIDDEN), t(p + "self_attn.q_proj.bias", HIDDEN)]
        shards[1] += [t(p + f"self_attn.{x}_proj.{k}", *((KV_HEADS * head, HIDDEN) if k == "weight" else
                                                        (KV_HEADS * head,))) for x in "kv" for k in ("weight", "bias")]
        shards[1] += [t(p + "self_attn.o_proj.weight", HIDDEN, HIDDEN)]
        shards[2] += [t(p + "mlp.gate_proj.weight", INTER, HIDDEN)]
        shards[3] += [t(p + "mlp.up_proj.weight", INTER, HIDDEN)]
        shards[4] += [t(p + "mlp.down_proj.weight", HIDDEN, INTER), t(p + "input_layernorm.weight", HIDDEN),
                      t(p + "post_attention_layernorm.weight", HIDDEN)]
    shards[4] += [t("model.norm.weight", HIDDEN), t("lm_head.weight", VOCAB, HIDDEN)]
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": HIDDEN,
              "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "num_hidden_layers": layers, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
              "tie_word_embeddings": False}
    return shards, config


def ensure_checkpoint(path: Path, gib: float) -> int:
    from ckptflow.flows.demo.synthetic import TOKENIZER_FILES, write_checkpoint
    from ckptflow.storage.urls import open_location

    stamp = path / "bench-params.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != {"gib": gib}:
        shutil.rmtree(path, ignore_errors=True)
        print(f"generating a {gib} GiB Qwen-shaped checkpoint with split groups in {path} …", flush=True)
        shards, config = qwen_shards(gib)
        write_checkpoint(open_location(str(path)), shards, config, TOKENIZER_FILES)
        stamp.write_text(json.dumps({"gib": gib}))
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def rss_line(**extra: object) -> None:
    """The child's last stdout line: its peak RSS and, in `seconds`, its time after imports.

    ru_maxrss starts from the parent's peak (a vforked child inherits it), so the parent keeps
    torch out; VmHWM (this process image's own high-water mark) is printed beside it."""
    hwm = next((int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")), 0)
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "vmhwm_bytes": hwm, **extra}))


def child_ckptflow(src: str, dst: str, max_shard_size: str) -> None:
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.files import INDEX_NAME, copy_file, index_document, write_json
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.run.execute import write_shard
    from ckptflow.tasks.plan.sizes import parse_size
    from ckptflow.tasks.planners.reindex import moved_bytes, moved_tensors, plan_reindex

    t0 = time.perf_counter()
    s, d = open_location(src), open_location(dst)
    ckpt = scan_checkpoint(s)
    plan = plan_reindex(ckpt, parse_size(max_shard_size))
    for shard in plan.shards:
        write_shard(shard, s, d)
    write_json(d, INDEX_NAME, index_document(plan.weight_map(), plan.total_size))
    for name in ckpt.other_files():
        if name != "bench-params.json":
            copy_file(s, d, name)
    seconds = time.perf_counter() - t0
    rss_line(seconds=seconds, shards=len(plan.shards), moved_tensors=moved_tensors(plan, ckpt),
             moved_bytes=moved_bytes(plan, ckpt),
             tensors=len(plan.weight_map()), weight_map=plan.weight_map())


def child_baseline(src: str, dst: str, plan_file: str) -> None:
    """Whole files in memory: load each needed source shard, gather, save_file, free when done."""
    from safetensors.torch import load_file, save_file

    t0 = time.perf_counter()
    target: dict[str, str] = json.loads(Path(plan_file).read_text())
    index = json.loads((Path(src) / "model.safetensors.index.json").read_text())
    source: dict[str, str] = index["weight_map"]
    outputs = sorted(set(target.values()))
    needs = {o: sorted({source[n] for n, f in target.items() if f == o}) for o in outputs}
    os.makedirs(dst, exist_ok=True)
    loaded: dict[str, dict] = {}
    for k, out in enumerate(outputs):
        for f in needs[out]:
            if f not in loaded:
                loaded[f] = load_file(os.path.join(src, f))
        state = {n: loaded[source[n]][n] for n in sorted(n for n, f in target.items() if f == out)}
        save_file(state, os.path.join(dst, out), metadata={"format": "pt"})
        del state
        later = {f for o in outputs[k + 1:] for f in needs[o]}
        for f in [f for f in loaded if f not in later]:
            del loaded[f]
    total = sum(os.path.getsize(os.path.join(dst, o)) for o in outputs)  # as the seed: not exact
    json.dump({"metadata": {"total_size": total}, "weight_map": target},
              open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f not in ("model.safetensors.index.json", "bench-params.json"):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    rss_line(seconds=time.perf_counter() - t0)


def child_generate(path: str, gib: str) -> None:
    ensure_checkpoint(Path(path), float(gib))


def child_compare(a: str, b: str) -> None:
    print(json.dumps({"same": same_tensors(Path(a), Path(b))}))


def warm(src: Path) -> None:
    """Read every input file once (a reused buffer: the parent's own peak RSS must stay small,
    since a child started with vfork inherits it in ru_maxrss)."""
    buf = bytearray(16 << 20)
    for f in sorted(src.iterdir()):
        if f.is_file():
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


CHILDREN = {"ckptflow": child_ckptflow, "baseline": child_baseline, "generate": child_generate,
            "compare": child_compare}
LABELS = {"baseline": "baseline (load/save)", "ckptflow": "ckptflow executor", "cp": "cp -r (floor)"}


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckptflow-bench-reindex")
    ap.add_argument("--gib", type=float, default=1.25)
    ap.add_argument("--max-shard-size", default="5GB")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return
    root = Path(args.dir)
    src = root / "src"
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    run_measured(me + ["generate", str(src), str(args.gib)])  # torch stays out of this process
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(src.glob('*.safetensors')))} shards, "
          f"max_shard_size {args.max_shard_size}")
    outs = {k: root / f"out-{k}" for k in LABELS}
    plan_file = root / "plan.json"
    cmds = {"ckptflow": me + ["ckptflow", str(src), str(outs["ckptflow"]), args.max_shard_size],
            "baseline": me + ["baseline", str(src), str(outs["baseline"]), str(plan_file)],
            "cp": ["cp", "-r", str(src), str(outs["cp"])]}
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in LABELS}
    inner: dict[str, list[float]] = {k: [] for k in LABELS}  # in-process seconds, imports excluded
    hwm: dict[str, int] = {k: 0 for k in LABELS}
    info: dict = {}
    order = list(LABELS)
    for r in range(args.repeat):
        if r == 0:  # the baseline follows ckptflow's plan, written by ckptflow's first run
            order = ["ckptflow"] + [k for k in order if k != "ckptflow"]
        for k in order:
            shutil.rmtree(outs[k], ignore_errors=True)
            os.sync()  # deletions (discards) and the previous run's write-back land before the clock
            time.sleep(0.5)
            warm(src)
            wall, wait_rss, out = run_measured(cmds[k])
            rss = wait_rss if k == "cp" else last_json(out)["peak_rss_bytes"]
            runs[k].append((wall, rss))
            inner[k].append(wall if k == "cp" else last_json(out)["seconds"])
            hwm[k] = max(hwm[k], 0 if k == "cp" else last_json(out)["vmhwm_bytes"])
            if k == "ckptflow":
                info = last_json(out)
                plan_file.write_text(json.dumps(info["weight_map"]))
        order = order[1:] + order[:1]  # each contender goes first in turn
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in runs.items()), flush=True)
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    rss = {k: max(m for _, m in v) for k, v in runs.items()}
    ok = all(last_json(run_measured(me + ["compare", str(outs["baseline"]), str(outs[k])])[2])["same"]
             for k in ("ckptflow",))
    print(f"\nplan: {info['shards']} output shards, moved {info['moved_tensors']} of {info['tensors']} tensors "
          f"({info['moved_bytes'] / 1e9:.3f} GB)")
    work = {k: statistics.median(v) for k, v in inner.items()}
    print(f"\n{'':26}{'wall s':>8}{'GB/s':>7}{'after imports s':>17}{'peak RSS':>11}{'VmHWM':>10}"
          "   (medians; RSS max)")
    for k, label in LABELS.items():
        print(f"{label:26}{wall[k]:8.2f}{size / wall[k] / 1e9:7.2f}{work[k]:17.2f}{mib(rss[k]):>11}"
              f"{mib(hwm[k]) if hwm[k] else 'n/a':>10}")
    print(f"\nwall ckptflow / baseline:  {wall['ckptflow'] / wall['baseline']:.2f}×   (target ≤ 0.5×)")
    print(f"RSS  ckptflow / baseline:  {rss['ckptflow'] / rss['baseline']:.3f}   (target ≤ 0.25)")
    print(f"wall ckptflow / cp -r:     {wall['ckptflow'] / wall['cp']:.2f}×   (target ≤ 1.5×)")
    print(f"after imports, ckptflow / baseline: {work['ckptflow'] / work['baseline']:.2f}×, "
          f"ckptflow / cp -r: {work['ckptflow'] / work['cp']:.2f}×")
    print(f"outputs tensor-for-tensor identical to the baseline's: {ok}")
    print("the CLI (`ckptflow convert --reindex`) adds Prefect's fixed start-up on top of the executor")
    if not ok:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
