"""Shared bench helpers: run a command as a child process, report its wall time and peak RSS."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in bytes from wait4 — the child or any of its waited-for children, stdout)."""
    full_env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", **(env or {}))
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdin=devnull,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.stdout.read(), proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(err.decode()[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024, out.decode()


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def same_tensors(a: Path, b: Path, names: list[str] | None = None) -> bool:
    """Every tensor of every .safetensors file (or of `names`) in `a` equals `b`'s, bit for bit."""
    import torch
    from safetensors import safe_open

    names = names or sorted(p.name for p in a.glob("*.safetensors"))
    if names != sorted(p.name for p in b.glob("*.safetensors") if p.name in names):
        return False
    for name in names:
        with safe_open(str(a / name), "pt") as x, safe_open(str(b / name), "pt") as y:
            if sorted(x.keys()) != sorted(y.keys()):
                return False
            for k in x.keys():
                tx, ty = x.get_tensor(k), y.get_tensor(k)
                if tx.dtype != ty.dtype or tx.shape != ty.shape or \
                        not torch.equal(tx.contiguous().view(torch.uint8), ty.contiguous().view(torch.uint8)):
                    return False
    return True
