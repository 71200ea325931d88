"""`ckptflow validate` on hostile headers: seconds and peak RSS, each case in a fresh process.

Cases: one valid 100 MB header of 1.75 M zero-size tensors, three of them in one checkpoint, and
the worst inputs that pass every cap — 500k tensors (the total cap) with an index, 700k (over it),
a header whose metadata holds as many entries as the structure budget allows, one whose ignored
field holds as many empty lists as it allows, and all of these in one checkpoint. Exits non-zero
if any case takes more than 20 s or 1 GiB, or ends with a traceback.

    .venv/bin/python bench/bench_hostile_headers.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckptflow.storage.safetensors_format import (HEADER_BUDGET, MAX_HEADER_BYTES, MAX_TENSORS_PER_FILE,  # noqa: E402
                                                 MAX_TENSORS_TOTAL)

MAX_SECONDS, MAX_RSS = 20.0, 2**30
ZERO = b'{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'


MEASURED_CLI = ROOT / "bench" / "measured_cli.py"  # writes its own VmHWM at exit


def write_st(path: Path, body: bytes, pad_to: int | None = None) -> None:
    """A safetensors file of zero-size tensors: header `body`, space-padded to `pad_to` bytes."""
    n = max(pad_to or 0, len(body) + (-len(body) % 8))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + body + b" " * (n - len(body)))


def zero_tensors(names: list[str]) -> bytes:
    return b"{" + b",".join(b'"%s":%s' % (n.encode(), ZERO) for n in names) + b"}"


def hostile_100mb(path: Path) -> None:
    write_st(path, zero_tensors(["%x" % i for i in range(1_750_000)]), MAX_HEADER_BYTES)


def at_the_caps(folder: Path, total: int, index: bool = True) -> None:
    """`total` zero-size tensors over files of MAX_TENSORS_PER_FILE each (and an index of them all)."""
    weight_map: dict[str, str] = {}
    files = -(-total // MAX_TENSORS_PER_FILE)
    for k in range(files):
        file = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        names = [f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.w{k}"
                 for i in range(k * MAX_TENSORS_PER_FILE, min(total, (k + 1) * MAX_TENSORS_PER_FILE))]
        write_st(folder / file, zero_tensors(names))
        weight_map.update(dict.fromkeys(names, file))
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def metadata_at_budget(path: Path) -> None:
    """One tensor and as many ~110-byte metadata entries as the ':' budget allows: ~95 MB."""
    n = HEADER_BUDGET.members - 8
    meta = b",".join(b'"k%07x":"%s"' % (i, b"v" * 96) for i in range(n))
    write_st(path, b'{"__metadata__":{' + meta + b'},"x":' + ZERO + b"}")


def lists_at_budget(path: Path) -> None:
    """One tensor whose ignored field holds as many empty lists as the ',' + '[' budget allows."""
    n = (HEADER_BUDGET.items - 16) // 2
    write_st(path, b'{"x":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"note":[' +
             b",".join([b"[]"] * n) + b"]}}")


def measure(args: list[str]) -> tuple[int, str, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        env = dict(os.environ, CKPTFLOW_HWM_FILE=str(hwm))
        t0 = time.perf_counter()
        run = subprocess.run([sys.executable, str(MEASURED_CLI), *args], cwd=ROOT, env=env,
                             capture_output=True, text=True)
        return run.returncode, run.stdout + run.stderr, time.perf_counter() - t0, int(hwm.read_text()) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="build the cases here and keep them (default: a temporary folder)")
    args = ap.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="hostile-headers-"))
    cases = {
        "one 100 MB header, 1.75M tensors": lambda d: hostile_100mb(d / "model.safetensors"),
        "three 100 MB headers": lambda d: [hostile_100mb(d / f"model-{k}-of-3.safetensors") for k in (1, 2, 3)],
        f"{MAX_TENSORS_TOTAL} tensors (the cap) + index": lambda d: at_the_caps(d, MAX_TENSORS_TOTAL),
        f"{MAX_TENSORS_TOTAL + MAX_TENSORS_PER_FILE} tensors, no index (over the cap)":
            lambda d: at_the_caps(d, MAX_TENSORS_TOTAL + MAX_TENSORS_PER_FILE, index=False),
        "metadata at the ':' budget": lambda d: metadata_at_budget(d / "model.safetensors"),
        "empty lists at the ',' budget": lambda d: lists_at_budget(d / "model.safetensors"),
        "all of the last three in one checkpoint": lambda d: (
            at_the_caps(d, MAX_TENSORS_TOTAL - 2), metadata_at_budget(d / "extra-1.safetensors"),
            lists_at_budget(d / "extra-2.safetensors")),
    }
    failed = False
    print(f"{'case':44s} {'exit':>4s} {'seconds':>8s} {'peak RSS':>9s}  first line of output")
    try:
        for i, (name, build) in enumerate(cases.items()):
            folder = base / f"case{i}"
            folder.mkdir(parents=True, exist_ok=True)
            build(folder)
            rc, out, seconds, rss = measure(["validate", str(folder)])
            first = next((line for line in out.splitlines() if line.strip()), "")
            bad = seconds > MAX_SECONDS or rss > MAX_RSS or "Traceback" in out or rc not in (0, 1, 2)
            failed |= bad
            print(f"{name:44s} {rc:4d} {seconds:8.1f} {rss / 2**20:6.0f} MiB  {first[:110]}"
                  + ("   <-- FAIL" if bad else ""), flush=True)
            if not args.keep:
                shutil.rmtree(folder)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"limits: {MAX_SECONDS:.0f} s and {MAX_RSS / 2**20:.0f} MiB per case; {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
