"""`ckptflow convert --dequant` vs the seed-000 whole-file baseline on a ≥ 1 GiB checkpoint.

Prints wall time, throughput and peak RSS of each (each run in its own process, same machine,
same page-cache state), their ratios, and Prefect's fixed start-up cost. Targets (issue 2):
peak RSS ≤ ¼ of the baseline's, throughput ≥ 1.5× the baseline's.

    python bench/bench_convert_dequant.py [--dir /tmp/ckptflow-bench] [--gib 1.4]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import mib, run_measured, same_tensors  # noqa: E402


def dims_for(gib: float):
    from ckptflow.flows.demo.synthetic import DeepSeekDims

    # DeepSeek-V3's real matrix shapes (hidden 7168, experts 2048 wide, MLA ranks 1536/512) with
    # fewer experts and heads: ~430 MB of FP8 per MoE layer, two layers per shard (~0.9 GB
    # shards; DeepSeek-V3's own are ~4.3 GB, which only widens the gap in the baseline's RSS).
    moe_layers = max(1, round((gib * 2**30 - 0.58e9) / 0.43e9))
    return DeepSeekDims(vocab_size=16000, hidden_size=7168, intermediate_size=4096, moe_intermediate_size=2048,
                        num_hidden_layers=1 + moe_layers, first_k_dense_replace=1, num_attention_heads=16,
                        n_routed_experts=8, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0, layers_per_shard=2)


def ensure_checkpoint(path: Path, gib: float) -> int:
    if not (path / "model.safetensors.index.json").exists():
        shutil.rmtree(path, ignore_errors=True)
        print(f"generating a {gib} GiB DeepSeek-V3-shaped FP8 checkpoint in {path} …", flush=True)
        # in a child process, so the generator's memory does not inflate this one's
        subprocess.run([sys.executable, __file__, "--generate-only", "--dir", str(path.parent),
                        "--gib", str(gib)], check=True)
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@contextmanager
def prefect_server(home: Path):
    """A real `prefect server start` on loopback, as a deployment would have; yields its API URL."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port), "--no-services"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckptflow-bench")
    ap.add_argument("--gib", type=float, default=1.4)
    ap.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = Path(args.dir)
    src = root / "fp8"
    if args.generate_only:
        from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
        from ckptflow.storage.urls import open_location

        make_deepseek_v3_fp8(open_location(str(src)), dims_for(args.gib))
        return
    size = ensure_checkpoint(src, args.gib)
    print(f"checkpoint: {size / 2**30:.2f} GiB in {len(list(src.glob('*.safetensors')))} shards")
    base_out, flow_out, work = root / "out-baseline", root / "out-ckptflow", root / "work"
    for p in (base_out, flow_out, work):
        shutil.rmtree(p, ignore_errors=True)
    # Warm the page cache for both runs alike (in small reads: this process's RSS stays small).
    for f in src.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass

    b_wall, _, out = run_measured([sys.executable, "bench/baseline_dequant.py", str(src), str(base_out)])
    b_rss = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]
    c_wall, _, out = run_measured([sys.executable, "-m", "ckptflow.flows.cli", "convert", str(src), str(flow_out),
                                   "--dequant", "--work", str(work), "--json", "--device", "cpu"])
    summary = json.loads(out.strip().splitlines()[-1])
    c_rss = summary["peak_rss_bytes"]  # the converting process itself; the Prefect server is apart
    shutil.rmtree(flow_out)
    shutil.rmtree(work)
    with prefect_server(root / "prefect-home") as api:
        s_wall, _, _ = run_measured([sys.executable, "-m", "ckptflow.flows.cli", "convert", str(src), str(flow_out),
                                     "--dequant", "--work", str(work), "--json", "--device", "cpu"],
                                    env={"PREFECT_API_URL": api})
    flow_s = summary["seconds"]
    startup = c_wall - flow_s
    ok = same_tensors(base_out, flow_out)

    print(f"\n{'':24}{'wall s':>9}{'GB/s in':>9}{'peak RSS':>11}")
    print(f"{'baseline (seed 000)':24}{b_wall:9.2f}{size / b_wall / 1e9:9.3f}{mib(b_rss):>11}")
    print(f"{'ckptflow (whole CLI)':24}{c_wall:9.2f}{size / c_wall / 1e9:9.3f}{mib(c_rss):>11}")
    print(f"{'ckptflow (flow only)':24}{flow_s:9.2f}{size / flow_s / 1e9:9.3f}")
    print(f"{'ckptflow, server up':24}{s_wall:9.2f}{size / s_wall / 1e9:9.3f}")
    print(f"\nPrefect fixed start-up (ephemeral server + imports): {startup:.1f} s")
    print(f"throughput ratio, whole CLI vs baseline:   {b_wall / c_wall:.2f}×   (target ≥ 1.5×)")
    print(f"throughput ratio, flow only vs baseline:   {b_wall / flow_s:.2f}×")
    print(f"throughput ratio, CLI with a running Prefect server (PREFECT_API_URL): {b_wall / s_wall:.2f}×")
    print(f"peak RSS ratio ckptflow / baseline:        {c_rss / b_rss:.3f}   (target ≤ 0.25)")
    print(f"outputs tensor-for-tensor identical:       {ok}")
    if not ok:
        raise SystemExit("outputs differ")


if __name__ == "__main__":
    main()
