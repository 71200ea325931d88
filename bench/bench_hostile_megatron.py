"""Hostile Megatron-LM inputs through the real CLI: peak RSS and seconds per case.

Each case is a file of at most a few MB that asks the loader for 1.5-3 GB (see
tests/megatron_fixtures.hostile_sources). `ckptflow megatron` must refuse each with exit status 2
and one `error:` line; this prints what it cost and exits 1 if any case used more than 1 GiB,
exited otherwise, or printed a traceback.

    .venv/bin/python bench/bench_hostile_megatron.py [--zip-blocks 179] [CASE ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.megatron_fixtures import hostile_sources, run_cli_measured, tiny_gpt2  # noqa: E402

LIMIT = 1 << 30


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cases", nargs="*", help="only these cases (default: all)")
    p.add_argument("--zip-blocks", type=int, default=179, help="zip bomb size in 16 MiB blocks (179: 3.0 GB)")
    args = p.parse_args()
    cases = hostile_sources(args.zip_blocks)
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    model, failed = tiny_gpt2(), []
    print(f"{'case':<22} {'source':>10} {'exit':>4} {'peak RSS':>10} {'seconds':>8}  error line")
    for name in args.cases or list(cases):
        build, _ = cases[name]
        with tempfile.TemporaryDirectory(prefix=f"hostile-{name}-") as tmp:
            src = build(Path(tmp), model)
            size = sum(f.stat().st_blocks * 512 for f in ([src] if src.is_file() else src.rglob("*")) if f.is_file())
            run, peak, seconds = run_cli_measured(["megatron", str(src), f"{tmp}/out", "--work", f"{tmp}/work"],
                                                  sys.executable, ROOT, env, Path(tmp) / "rss")
        errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
        ok = run.returncode == 2 and len(errors) == 1 and peak <= LIMIT and "Traceback" not in run.stderr
        failed += [] if ok else [name]
        line = errors[0] if errors else run.stderr.strip().splitlines()[-1:]
        print(f"{name:<22} {size / 1e6:>8.2f}MB {run.returncode:>4} {peak / 2**20:>6.0f} MiB {seconds:>8.1f}  "
              f"{str(line)[:150]}")
    if failed:
        print(f"FAILED (over {LIMIT >> 20} MiB, wrong exit status or not one error line): {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
