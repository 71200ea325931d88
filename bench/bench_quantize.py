"""Quantize throughput and peak memory at real shapes: ckptflow `--quantize` against llm-compressor's
`model_free_ptq` on the same input, in the same run.

The source is Llama-70B-shaped BF16 (hidden 8192, MLP 28672, 64 query / 8 KV heads of 128), random
values (a hole of zeros would give every block the same scale and a degenerate global scale), whole
layers in model order, fused groups (q/k/v, gate/up) never split across shards:
- `--size 2GiB` (default): one shard of 2 GiB;
- `--size 13GB`: three shards of ~4.3 GB, as the HF Hub cuts Llama-70B.

For each scheme (NVFP4A16 → `--quantize nvfp4`, FP8_BLOCK → `--quantize fp8-block`):
- llm-compressor 0.14 `model_free_ptq(SRC, DST, scheme, ignore=["lm_head"], device="cpu")` in a child
  process of its own venv (`--llmc-python`, default /work/venvs/llmc/bin/python), one worker;
- `ckptflow convert SRC DST --quantize SCHEME --json` (the real CLI, its temporary Prefect server
  included) when this checkout's CLI has `--quantize`; otherwise the ckptflow half is reported
  unavailable and only llm-compressor's figures print.
Each child reports its own peak RSS (VmHWM: wait4's ru_maxrss would carry this parent's peak across
fork + exec; ckptflow's is in its --json summary); GB/s is source bytes over the child's wall time.
Ratios are ckptflow's throughput over llm-compressor's (the issue's target: ≥ 2x, peak RSS ≤ 700 MiB
and flat from 2 GiB to 13 GB). The outputs' headers (tensor names, dtypes, shapes) are compared too.

    python bench/bench_quantize.py [--size 2GiB|13GB] [--schemes nvfp4,fp8-block] [--dir /tmp/ckptflow-quant]

Measured 2026-12-06, 2 GiB (2.01 GB, one shard), this 2-core machine shared with other engineers' test runs
(load average 17-19 throughout, so absolute times are several times an idle machine's); llm-compressor
0.14.0.1, compressed-tensors 0.19.0, torch 2.13.0+cpu; ckptflow half unavailable (no --quantize yet):
  nvfp4     model_free_ptq NVFP4A16:  604.1 s (565.3 s in the call)  0.003 GB/s  peak RSS 7909 MiB (4.1x the source)
  fp8-block model_free_ptq FP8_BLOCK: 156.1 s (123.8 s in the call)  0.013 GB/s  peak RSS 4796 MiB (2.5x the source)
Again at 23:00 (load 5-9), ckptflow's half run from the quant-stage worktree's venv (its --quantize as of
that hour, not yet merged; this bench file unchanged):
  nvfp4     model_free_ptq NVFP4A16:  301.4 s (285.7 s in the call)  0.007 GB/s  peak RSS 8308 MiB (4.3x the source)
            ckptflow --quantize nvfp4: 186.1 s (shards 168.4 s)  0.011 GB/s (1.62x)  peak RSS 569 MiB (0.07x)
  fp8-block model_free_ptq FP8_BLOCK:  92.7 s (74.9 s in the call)  0.022 GB/s  peak RSS 4803 MiB (2.5x the source)
            ckptflow --quantize fp8-block: 50.3 s (shards 31.3 s)  0.040 GB/s (1.84x)  peak RSS 480 MiB (0.10x)
  Both outputs have llm-compressor's tensor names, dtypes and shapes.
Again at 23:38 (load 8.6 at the start, falling to 2.9), with branch quant-speed (row chunks read straight into
pooled buffers, amax on the bits, codes into pooled buffers; the engine alone on the same 2.01 GB shard, same
call, main then quant-speed: nvfp4 21.7 s -> 10.9 s, fp8-block 6.9 s -> 4.4 s):
  nvfp4     model_free_ptq NVFP4A16:  129.3 s (115.2 s in the call)  0.016 GB/s  peak RSS 8386 MiB
            ckptflow --quantize nvfp4:  17.3 s (shards 11.4 s)  0.117 GB/s (7.48x)  peak RSS 376 MiB (0.04x)
  fp8-block model_free_ptq FP8_BLOCK:   24.8 s (18.8 s in the call)  0.081 GB/s  peak RSS 4718 MiB
            ckptflow --quantize fp8-block: 10.9 s (shards 4.1 s)  0.184 GB/s (2.27x)  peak RSS 471 MiB (0.10x)
  Most of ckptflow's fp8-block wall time is now the CLI's fixed cost (imports, temporary Prefect server).
The 13 GB variant was not run (shared machine: llm-compressor would need ~4x a 4.3 GB shard of RAM).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, mib  # noqa: E402

HIDDEN, INTER, Q_HEADS, KV_HEADS, HEAD_DIM, VOCAB = 8192, 28672, 64, 8, 128, 128256
SIZES = {"2GiB": (2 << 30, 2 << 30), "13GB": (13_000_000_000, 4_300_000_000)}  # (total, per shard)
SCHEMES = {"nvfp4": "NVFP4A16", "fp8-block": "FP8_BLOCK"}  # ckptflow --quantize → llm-compressor preset
DEFAULT_LLMC = "/work/venvs/llmc/bin/python"

# Runs under llm-compressor's venv: nothing from ckptflow. Prints its own VmHWM (KiB) last.
LLMC_CHILD = """
import json, sys, time
from llmcompressor import model_free_ptq
t0 = time.perf_counter()
model_free_ptq(sys.argv[1], sys.argv[2], scheme=sys.argv[3], ignore=["lm_head"], max_workers=1, device="cpu")
work = time.perf_counter() - t0
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]
print(json.dumps({"work_s": work, "hwm_kib": int(hwm)}))
"""


def layer_units(i: int) -> list[list[tuple[str, tuple[int, int]]]]:
    """Layer i's Linear weights in model order, as units never split across shards (fused groups)."""
    p = f"model.layers.{i}."
    kv = KV_HEADS * HEAD_DIM
    return [[(p + "input_layernorm.weight", (HIDDEN,))],
            [(p + "self_attn.q_proj.weight", (Q_HEADS * HEAD_DIM, HIDDEN)),
             (p + "self_attn.k_proj.weight", (kv, HIDDEN)), (p + "self_attn.v_proj.weight", (kv, HIDDEN))],
            [(p + "self_attn.o_proj.weight", (HIDDEN, Q_HEADS * HEAD_DIM))],
            [(p + "post_attention_layernorm.weight", (HIDDEN,))],
            [(p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN))],
            [(p + "mlp.down_proj.weight", (HIDDEN, INTER))]]


def plan_shards(total: int, per_shard: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = used = 0
    layer = 0
    while True:
        for unit in layer_units(layer):
            nbytes = sum(2 * _numel(s) for _, s in unit)
            if used + nbytes > total:
                return [s for s in shards if s]
            if size + nbytes > per_shard and shards[-1]:
                shards.append([])
                size = 0
            shards[-1].extend(unit)
            size += nbytes
            used += nbytes
        layer += 1


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def make_source(path: Path, total: int, per_shard: int) -> int:
    """Random BF16 shards written tensor by tensor (memory: one tensor), an index and a config."""
    import torch

    from ckptflow.storage.safetensors_format import TensorSpec, build_header

    shards = plan_shards(total, per_shard)
    path.mkdir(parents=True, exist_ok=True)
    weight_map, nbytes, layers = {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for k, tensors in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        specs = [TensorSpec(n, "BF16", s) for n, s in tensors]
        with open(path / file, "wb") as f:
            f.write(build_header(specs, {"format": "pt"}))
            for spec in specs:
                t = (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16)
                f.write(t.view(torch.uint8).numpy())  # no bytes copy: one tensor's memory
                weight_map[spec.name] = file
                nbytes += spec.nbytes
                layers = max(layers, int(spec.name.split(".")[2]) + 1)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": nbytes},
                                                                    "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": Q_HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "num_hidden_layers": layers,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))
    return nbytes


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **(env or {})), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write((proc.stdout + proc.stderr)[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, proc


def run_llmc(python: str, src: Path, dst: Path, preset: str) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    wall, proc = run_child([python, "-c", LLMC_CHILD, str(src), str(dst), preset])
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "work_s": info["work_s"], "rss": info["hwm_kib"] * 1024}


def ckptflow_has_quantize() -> bool:
    proc = subprocess.run([sys.executable, "-m", "ckptflow.flows.cli", "convert", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    return "--quantize" in proc.stdout


def run_ckptflow(src: Path, dst: Path, scheme: str, work: Path) -> dict:
    """The real CLI with --json: its summary carries the process's own peak RSS (VmHWM, taken after
    the last shard) and the shard time; measured_cli.py's at-exit figure is lost to the `os._exit`
    a CLI run on its temporary Prefect server leaves by (flows/runtime/interrupt.leave)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    wall, proc = run_child([sys.executable, "-m", "ckptflow.flows.cli", "convert", str(src), str(dst),
                            "--quantize", scheme, "--work", str(work), "--json"])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "rss": summary["peak_rss_bytes"], "shard_s": summary.get("shard_seconds")}


def headers(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor's (dtype, shape) across the output's shards, from the headers."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            doc = json.loads(fh.read(n))
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in doc.items() if k != "__metadata__"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="2GiB")
    ap.add_argument("--schemes", default="nvfp4,fp8-block")
    ap.add_argument("--dir", default="/tmp/ckptflow-quant")
    ap.add_argument("--llmc-python", default=os.environ.get("CKPTFLOW_LLMC_PYTHON", DEFAULT_LLMC))
    args = ap.parse_args()
    base = Path(args.dir)
    shutil.rmtree(base, ignore_errors=True)
    src = base / f"src-{args.size}"
    t0 = time.perf_counter()
    nbytes = make_source(src, *SIZES[args.size])
    print(f"# load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} (1/5 min), cpus {os.cpu_count()}")
    print(f"# source: {len(list(src.glob('*.safetensors')))} shard(s), {nbytes / 1e9:.2f} GB BF16 Llama-70B-shaped "
          f"(made in {time.perf_counter() - t0:.0f} s)")
    ours = ckptflow_has_quantize()
    if not ours:
        print("# ckptflow: unavailable — this checkout's `ckptflow convert` has no --quantize (branch quant-stage); "
              "llm-compressor's half only")
    for scheme in args.schemes.split(","):
        preset = SCHEMES[scheme]
        ref = run_llmc(args.llmc_python, src, base / f"llmc-{scheme}", preset)
        gbps = nbytes / ref["wall_s"] / 1e9
        print(f"{scheme:10} llm-compressor model_free_ptq {preset}: {ref['wall_s']:6.1f} s ({ref['work_s']:.1f} s in "
              f"the call)  {gbps:.3f} GB/s  peak RSS {mib(ref['rss'])} "
              f"({ref['rss'] / nbytes * 100:.0f}% of the source)")
        if not ours:
            continue
        mine = run_ckptflow(src, base / f"ckptflow-{scheme}", scheme, base / f"work-{scheme}")
        ours_gbps = nbytes / mine["wall_s"] / 1e9
        same = headers(base / f"ckptflow-{scheme}") == headers(base / f"llmc-{scheme}")
        print(f"{'':10} ckptflow convert --quantize {scheme}: {mine['wall_s']:6.1f} s (shards {mine['shard_s']} s)  "
              f"{ours_gbps:.3f} GB/s "
              f"({ours_gbps / gbps:.2f}x llm-compressor's)  peak RSS {mib(mine['rss'])} "
              f"({mine['rss'] / ref['rss']:.2f}x)  same tensor names, dtypes, shapes: {same}")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
