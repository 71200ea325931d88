"""GETs a conversion from a bucket makes: small neighbouring tensors in one GET per run
(`storage/read_runs.py`) against one GET per tensor, same run, same checkpoint.

The demo checkpoint (DeepSeek-V3-shaped, FP8 with block scales; `--layers` sets its depth) is put
in moto's S3 on loopback, then converted to BF16 on local disk by the engine twice: the baseline
with `RangeReader.expect` switched off (every range its own GET), then as shipped. Printed for each:
ranged GETs of tensor data, bytes they fetched, CPU seconds of this process (moto's server runs
in it too: each request costs on both sides) and wall seconds; the outputs must be identical.

    python bench/bench_s3_reads.py [--layers 3]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.safetensors")):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    args = ap.parse_args()

    import s3fs
    from moto.server import ThreadedMotoServer

    import ckptflow.storage.reader as reader
    from ckptflow.flows.conversion import run_convert
    from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("bench-reads")
    base = Path(tempfile.mkdtemp(prefix="bench-s3-reads-"))
    make_deepseek_v3_fp8(open_location(str(base / "src")), DeepSeekDims(num_hidden_layers=args.layers))
    fs.put(str(base / "src") + "/", "bench-reads/src/", recursive=True)

    gets: list[int] = []
    real_cat = reader._cat

    def counted(loc, name, start, end):
        data = real_cat(loc, name, start, end)
        if start > 0 and name.endswith(".safetensors"):  # tensor data, not headers or JSON
            gets.append(len(data))
        return data

    reader._cat = counted
    shipped_expect = reader.RangeReader.expect
    results = {}
    for label, expect in (("one GET per tensor", lambda self, ranges: None), ("runs", shipped_expect)):
        reader.RangeReader.expect = expect
        gets.clear()
        out = base / label.replace(" ", "-")
        c0, t0 = cpu(), time.perf_counter()
        run_convert("s3://bench-reads/src", str(out), str(base / f"work-{out.name}"), storage_options=opts,
                    dequant=True, max_workers=4)
        results[label] = (len(gets), sum(gets), cpu() - c0, time.perf_counter() - t0, digest(out))
    reader.RangeReader.expect = shipped_expect
    server.stop()

    for label, (n, nbytes, used, wall, _) in results.items():
        print(f"{label:>20}: {n:5d} data GETs, {nbytes / 1e6:7.2f} MB, {used:5.2f} CPU-s, {wall:5.2f} s")
    (n0, b0, c0_, w0, d0), (n1, b1, c1, w1, d1) = results.values()
    if d0 != d1:
        raise SystemExit("the outputs differ")
    print(f"GETs {n0 / n1:.1f}x fewer, same bytes ({b1 == b0}), CPU {c0_ / c1:.1f}x less, identical output")


if __name__ == "__main__":
    main()
