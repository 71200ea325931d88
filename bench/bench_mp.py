"""MP sharding (DeepSeek-V3 preset) vs seed 001's approach, on a ≥ 1 GiB DeepSeek-V3-layout checkpoint.

Each side runs in its own child process (same machine, page cache warmed for both) and prints
its own peak RSS. The baseline does what inference/convert.py does: `safe_open` + `get_tensor`
every tensor, `narrow().contiguous()` per rank, every rank's state dict held until the end, then
`save_file` per rank. ckptflow: `scan_checkpoint` + `plan_mp` + `write_shard` per rank file (no
Prefect here; the CLI adds Prefect's fixed start-up on top). Targets (issue 5): peak RSS ≤ ¼ of
the baseline's, wall ≤ 1.2× the baseline's; outputs identical tensor for tensor.

    python bench/bench_mp.py [--src DIR] [--dir /tmp/ckptflow-bench-mp] [--world 4] [--jobs 1] [--generate]
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import mib, run_measured, same_tensors  # noqa: E402
from bench.seed001 import seed_rank_state_dicts  # noqa: E402

REUSE = Path("/tmp/ckptflow-bench/fp8")  # bench_convert_dequant.py's checkpoint, when present


def peak_rss() -> dict[str, int]:
    """ru_maxrss as asked, plus VmHWM: Linux carries the parent's high-water mark into a child's
    ru_maxrss across fork/vfork + exec, VmHWM belongs to the new image alone."""
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "vm_hwm_bytes": hwm * 1024}


def warm(src: Path) -> None:
    """Read every shard into the page cache through one small buffer. Reading whole files here
    (`read_bytes`) would raise this process's RSS high-water mark to the largest shard, and
    every child spawned after it would report at least that as its own ru_maxrss."""
    buf = bytearray(16 << 20)
    for f in src.glob("*.safetensors"):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass


def baseline(src: str, dst: str, world: int) -> None:
    """Seed 001's algorithm and memory profile (MTP layers taken from config.json, not '61')."""
    from safetensors.torch import save_file

    state_dicts = seed_rank_state_dicts(src, world)
    os.makedirs(dst, exist_ok=True)
    for i in range(world):
        save_file(state_dicts[i], os.path.join(dst, f"model{i}-mp{world}.safetensors"))
    for file in Path(src).glob("*token*"):
        shutil.copyfile(file, os.path.join(dst, file.name))
    print(json.dumps(peak_rss()))


def ckptflow(src: str, dst: str, world: int, jobs: int) -> None:
    """The planner + the streaming executor, one write_shard per rank file, no Prefect."""
    from concurrent.futures import ThreadPoolExecutor

    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.run.execute import write_shard
    from ckptflow.tasks.planners.mp import plan_mp

    t0 = time.perf_counter()
    src_loc, dst_loc = open_location(src), open_location(dst)
    plan = plan_mp(scan_checkpoint(src_loc), world, "deepseek-v3")
    plan_s = time.perf_counter() - t0
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda shard: write_shard(shard, src_loc, dst_loc), plan.shards))
    for file in Path(src).iterdir():  # what the flow's finalize step does with copy_files
        if any(fnmatch.fnmatch(file.name, g) for g in plan.copy_files or ("*",)):
            shutil.copyfile(file, os.path.join(dst, file.name))
    print(json.dumps({**peak_rss(), "plan_s": plan_s, "torch_imported": "torch" in sys.modules}))


def generate(path: str) -> None:
    """bench_convert_dequant's dims (they divide by 4, in whole FP8 blocks) plus an MTP layer."""
    from dataclasses import replace

    from bench.bench_convert_dequant import dims_for
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    shutil.rmtree(path, ignore_errors=True)
    make_deepseek_v3_fp8(open_location(path), replace(dims_for(1.4), num_nextn_predict_layers=1))


def ensure_checkpoint(src: Path | None, root: Path, fresh: bool) -> Path:
    if src is not None:
        return src
    if not fresh and (REUSE / "model.safetensors.index.json").exists():
        return REUSE
    path = root / "src"
    if not (path / "model.safetensors.index.json").exists():
        # In a child: torch and the generated tensors would otherwise raise this process's RSS
        # high-water mark, which the measured children inherit (see peak_rss).
        print(f"generating a DeepSeek-V3-layout FP8 checkpoint (with an MTP layer) in {path} …", flush=True)
        run_measured([sys.executable, str(Path(__file__).resolve()), "generate", str(path)])
    return path


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        return generate(sys.argv[2])
    if len(sys.argv) > 1 and sys.argv[1] == "baseline":
        return baseline(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "ckptflow":
        return ckptflow(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", type=Path, default=None, help=f"default: {REUSE} if present, else generated")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/ckptflow-bench-mp"))
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--generate", action="store_true",
                    help="use (or make) DIR/src, which has an MTP layer, even when the reusable one exists")
    ap.add_argument("--jobs", type=int, default=1, help="rank files written at once by ckptflow")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src = ensure_checkpoint(args.src, args.dir, args.generate)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"checkpoint: {src} ({size / 2**30:.2f} GiB), N={args.world}, ckptflow jobs={args.jobs}")
    base_out, flow_out = args.dir / "out-baseline", args.dir / "out-ckptflow"
    for p in (base_out, flow_out):
        shutil.rmtree(p, ignore_errors=True)
    warm(src)  # the page cache, for both runs alike
    me = str(Path(__file__).resolve())
    b_wall, _, out = run_measured([sys.executable, me, "baseline", str(src), str(base_out), str(args.world)])
    base = json.loads(out.strip().splitlines()[-1])
    b_rss = base["peak_rss_bytes"]
    c_wall, _, out = run_measured([sys.executable, me, "ckptflow", str(src), str(flow_out), str(args.world),
                                   str(args.jobs)])
    child = json.loads(out.strip().splitlines()[-1])
    ok = same_tensors(base_out, flow_out, [f"model{r}-mp{args.world}.safetensors" for r in range(args.world)])
    written = sum(p.stat().st_size for p in flow_out.glob("*.safetensors"))

    print()
    print(f"{'':26}{'wall s':>9}{'peak RSS':>11}{'VmHWM':>11}")
    print(f"{'baseline (seed 001)':26}{b_wall:9.2f}{mib(b_rss):>11}{mib(base['vm_hwm_bytes']):>11}")
    print(f"{'ckptflow (plan + write)':26}{c_wall:9.2f}{mib(child['peak_rss_bytes']):>11}"
          f"{mib(child['vm_hwm_bytes']):>11}"
          f"   (scan + plan {child['plan_s']:.2f} s; torch imported: {child['torch_imported']})")
    print(f"\nwritten: {written / 2**30:.2f} GiB in {args.world} rank files")
    print(f"wall ratio ckptflow / baseline:      {c_wall / b_wall:.2f}×   (target ≤ 1.2×)")
    print(f"peak RSS ratio ckptflow / baseline:  {child['peak_rss_bytes'] / b_rss:.3f}   (target ≤ 0.25)")
    print(f"outputs tensor-for-tensor identical: {ok}")
    print("(the `ckptflow convert` CLI adds Prefect's fixed start-up, a few seconds, on top)")
    if not ok:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
