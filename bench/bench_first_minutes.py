"""A user's first minutes (issue 14): how long each input error takes to reach the user, and
where the demo's, a fresh convert's and a cached rerun's time goes.

Every command runs as a real CLI subprocess. Errors: wall clock to the `error:` line (target
≤ 1 s). Conversions: wall clock, split into
  imports   `import ckptflow.flows.convert` (Prefect + torch) in a fresh interpreter, measured apart
  before    process start → the flow is called (interpreter, imports, headers, planning)
  prefect   flow called → body starts, body ends → call returns (temporary server, run records)
  flow      the flow body (shard tasks, finalize, read-back verify)
  shutdown  summary printed → process gone (Prefect's teardown; ~0 once the CLI skips it)
from the summary's `timing` (`--json`); a code tree without it (`--code-root` of an older
checkout) gets the wall clock only. Load matters on a shared machine: `uptime` is printed.

    python bench/bench_first_minutes.py [--dir /tmp/ckptflow-bench-first] [--code-root OLD_CHECKOUT]

`--code-root` runs another checkout's flows/tasks/storage as `ckptflow` (for before/after).

Measured 2026-12-02, idle 2-core machine (load 0.8), before (3e5c41a: Prefect's own temporary
server started from a thread) → after (ckptflow's temporary server spawned at plan time, URL
exported before Prefect loads):
    demo, first run             14.96 s → 11.51 s
    demo, second run             8.00 s →  5.12 s   (target ≤ 8 s)
    convert, fresh               7.78 s →  7.10 s   (target ≤ 10 s)
    convert, cached rerun        9.38 s →  5.12 s
    with `ckptflow server start`:  fresh 5.17 s, cached 4.08 s, demo 4.31 s
    errors (missing source, bad index, unknown --preset, --mp 3): 0.29-0.39 s each
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def env_for(code_root: str | None, home: Path) -> dict[str, str]:
    env = {**os.environ, "HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    if code_root:  # a shim package whose folders are the other checkout's
        shim = home / "shim" / "ckptflow"
        shim.mkdir(parents=True, exist_ok=True)
        (shim / "__init__.py").touch()
        for d in ("flows", "tasks", "storage"):
            link = shim / d
            if not link.exists():
                link.symlink_to(Path(code_root).resolve() / d)
        env["PYTHONPATH"] = str(shim.parent)
    return env


def run(args: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ckptflow.flows.cli", *args], env=env, capture_output=True,
                          text=True, timeout=900)
    return time.perf_counter() - t0, proc


def split(wall: float, proc: subprocess.CompletedProcess) -> str:
    try:
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        t = summary["timing"]
    except (ValueError, KeyError, IndexError):
        m = re.search(r"time:\s+([0-9.]+) s", proc.stdout)
        return f"wall {wall:6.2f} s   (no timing in this version; its own 'time:' said {m.group(1) if m else '?'} s)"
    return (f"wall {wall:6.2f} s = before {t['before_flow_s']:5.2f} + prefect {t['prefect_s']:5.2f} + "
            f"flow {t['flow_s']:5.2f} + shutdown {max(0.0, wall - t['waited_s']):5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ckptflow-bench-first")
    ap.add_argument("--code-root", help="an older checkout to measure instead of the installed code")
    a = ap.parse_args()
    root = Path(a.dir)
    shutil.rmtree(root, ignore_errors=True)
    home = root / "home"
    home.mkdir(parents=True)
    env = env_for(a.code_root, home)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ckptflow.flows.convert"], env=env, check=True)
    print(f"imports (prefect + torch + ckptflow.flows.convert): {time.perf_counter() - t0:.2f} s")

    wall, proc = run(["demo", str(root / "demo")], env)
    print(f"demo, first run (fresh PREFECT_HOME: migrations): wall {wall:6.2f} s  rc={proc.returncode}")
    wall, proc = run(["demo", str(root / "demo")], env)
    print(f"demo, second run:                                 wall {wall:6.2f} s  rc={proc.returncode}")
    src = root / "demo" / "source-fp8"

    for label, dest in (("convert, fresh", "out"), ("convert, cached rerun", "out")):
        wall, proc = run(["convert", str(src), str(root / dest), "--dequant", "--work", str(root / "w"),
                          "--json"], env)
        print(f"{label:<22} {split(wall, proc)}  rc={proc.returncode}")

    # `ckptflow server start` once; later runs find it and pay no server start-up (newer code only)
    env_local = {**env, "CKPTFLOW_SERVER_HOME": str(root / "local-server")}
    started = subprocess.run([sys.executable, "-m", "ckptflow.flows.cli", "server", "start"], env=env_local,
                             capture_output=True, text=True, timeout=300)
    if started.returncode == 0:
        try:
            for label, dest in (("local server, fresh", "out-local"), ("local server, cached", "out-local")):
                wall, proc = run(["convert", str(src), str(root / dest), "--dequant", "--work",
                                  str(root / "w-local"), "--json"], env_local)
                print(f"{label:<22} {split(wall, proc)}  rc={proc.returncode}")
            wall, proc = run(["demo", str(root / "demo")], env_local)
            print(f"demo, local server:    wall {wall:6.2f} s  rc={proc.returncode}")
        finally:
            subprocess.run([sys.executable, "-m", "ckptflow.flows.cli", "server", "stop"], env=env_local,
                           capture_output=True, timeout=60)

    bad = root / "bad-index"
    shutil.copytree(src, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00009-of-00006.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    errors = {
        "missing source": ["convert", str(root / "nothing"), str(root / "e1"), "--dequant"],
        "invalid index": ["convert", str(bad), str(root / "e2"), "--dequant"],
        "unknown --preset": ["convert", str(src), str(root / "e3"), "--mp", "2", "--preset", "nope"],
        "--mp 3": ["convert", str(src), str(root / "e4"), "--dequant", "--mp", "3"],
    }
    for label, args in errors.items():
        wall, proc = run(args, env)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        print(f"error {label:<18} {wall:6.2f} s  rc={proc.returncode}  error lines={len(lines)}  "
              f"{(lines or ['?'])[0][:90]}")
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
