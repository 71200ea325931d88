"""Hostile module patterns in a quantization config: `inspect` and `convert --dequant --dry-run`
through the real CLI, each case in a fresh process, then matching 90k DeepSeek-V3-shaped names.

Each case is a small generated checkpoint (a tiny Llama in compressed-tensors FP8, or gpt-oss
MXFP4) whose `ignore` / `modules_to_not_convert` gets one extra pattern that makes `re` backtrack:
`re:(.|\\w)+@`, `re:((.+))+@`, fourteen `.*`, the glob `**************@` (in both kinds of
config), `re:(.*\\.){12}@` (polynomial in re: every way to place twelve dots; the old
nested-quantifier guard refused this valid pattern), and a backreference, which is outside the
linear subset and refused. A case passes when both commands
answer (exit 0, or 1/2 with one `error:`/refusal line, never a traceback) within MAX_SECONDS,
or within SLACK of the same command on the baseline checkpoint (no hostile pattern) when the
machine is so loaded that the CLI's start-up alone takes about MAX_SECONDS.
Before the linear matcher each of the first five ran for minutes (414 s for 35 tensors; killed
at 30 s here on 2026-12-06), `(.*\\.){12}` was refused and the backreference was run by `re`.

The second part matches 90k names (61 layers x 256 experts x 3 projections, weights and scales)
against typical pattern lists with the matcher and with the re-based rule it replaced.

    .venv/bin/python bench/bench_hostile_patterns.py [--timeout 60] [--names-only]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the gpt-oss fixture config warns about RoPE
from tests.quant_fixtures import make_gpt_oss_mxfp4, make_llama  # noqa: E402

MAX_SECONDS, SLACK = 2.0, 0.5
GLOB = "*" * 14 + "@"
CASES = [  # (label, checkpoint kind, hostile pattern); the baseline first: the CLI's own start-up
    ("baseline: ignore lm_head only", "ct-fp8", None),
    ("ignore re:(.|\\w)+@", "ct-fp8", r"re:(.|\w)+@"),
    ("ignore re:((.+))+@", "ct-fp8", "re:((.+))+@"),
    ("ignore re: + 14x .* + @", "ct-fp8", "re:" + ".*" * 14 + "@"),
    ("ignore glob 14x * + @", "ct-fp8", GLOB),
    ("gpt-oss modules_to_not_convert glob", "mxfp4", GLOB),
    ("ignore re:(.*\\.){12}@", "ct-fp8", r"re:(.*\.){12}@"),
    ("ignore re:(\\w+)\\.\\1+@ (refused)", "ct-fp8", r"re:(\w+)\.\1+@"),
]


def build(folder: Path, kind: str, pattern: str | None) -> Path:
    src = make_llama(folder, "ct-fp8-channel") if kind == "ct-fp8" else make_gpt_oss_mxfp4(folder)
    config = json.loads((src / "config.json").read_text())
    q = config["quantization_config"]
    key = "ignore" if kind == "ct-fp8" else "modules_to_not_convert"
    if pattern is not None:
        q[key] = q[key] + [pattern]
    (src / "config.json").write_text(json.dumps(config))
    return src


def run_cli(args: list[str], timeout: float) -> tuple[str, float, str]:
    """(exit status or 'killed', seconds, first line of the answer)."""
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    t0 = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed", time.perf_counter() - t0, f"no answer in {timeout:.0f} s"
    out = run.stdout + run.stderr
    if "Traceback" in out:
        return f"{run.returncode} traceback", time.perf_counter() - t0, out.strip().splitlines()[-1]
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("error:", "- config.json"))), lines[0] if lines else "")
    return str(run.returncode), time.perf_counter() - t0, first


def old_rule(pattern: str, module: str) -> bool:
    """ckptflow's matching before the linear matcher (re per pattern, per name)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if "*" in pattern:
        return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), module) is not None
    return module == pattern or module.endswith("." + pattern)


def bench_names() -> None:
    from ckptflow.tasks.planners.linear_match import compile_patterns

    names = [f"model.layers.{layer}.mlp.experts.{e}.{p}{s}" for layer in range(61) for e in range(256)
             for p in ("gate_proj", "up_proj", "down_proj") for s in ("", "_scale")][:90_000]
    lists = {"lm_head": ["lm_head"],
             "compressed-tensors re:": ["lm_head", "re:.*mlp.gate$", "re:.*self_attn.*"],
             "ModelOpt 61 globs": ["lm_head"] + [f"model.layers.{i}.self_attn*" for i in range(61)],
             "61 plain names": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in range(61)],
             "hostile re: 14x .*": ["re:" + ".*" * 14 + "@"]}
    print(f"\n{len(names)} names     {'matcher s':>9s} {'old re s':>9s}")
    for label, patterns in lists.items():
        t0 = time.perf_counter()
        matcher = compile_patterns(patterns, label)
        hits = sum(map(matcher.matches, names))
        ours = time.perf_counter() - t0
        if label.startswith("hostile"):
            print(f"{label:22s} {ours:9.2f} {'hours':>9s}")
            continue
        t0 = time.perf_counter()
        assert hits == sum(any(old_rule(p, n) for p in patterns) for n in names)
        print(f"{label:22s} {ours:9.2f} {time.perf_counter() - t0:9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timeout", type=float, default=60.0, help="kill a command after this many seconds")
    ap.add_argument("--names-only", action="store_true", help="only the 90k-name part")
    args = ap.parse_args()
    failed = False
    if not args.names_only:
        print(f"{'case':38s} {'command':9s} {'exit':>6s} {'seconds':>8s} {'+base':>6s}  answer")
        baseline: dict[str, float] = {}
        with tempfile.TemporaryDirectory(prefix="hostile-patterns-") as tmp:
            for i, (label, kind, pattern) in enumerate(CASES):
                src = build(Path(tmp) / f"case{i}", kind, pattern)
                for command, cli_args in (("inspect", ["inspect", str(src)]),
                                          ("dry-run", ["convert", str(src), str(Path(tmp) / f"out{i}"),
                                                       "--dequant", "--dry-run"])):
                    rc, seconds, first = run_cli(cli_args, args.timeout)
                    base = baseline.setdefault(command, seconds)
                    bad = min(seconds - MAX_SECONDS, seconds - base - SLACK) > 0 or rc not in ("0", "1", "2")
                    failed |= bad
                    print(f"{label:38s} {command:9s} {rc:>6s} {seconds:8.2f} {seconds - base:+6.2f}  {first[:90]}"
                          + ("   <-- FAIL" if bad else ""), flush=True)
        print(f"limit: {MAX_SECONDS:.0f} s per command (or {SLACK} s over the baseline); "
              f"{'FAIL' if failed else 'ok'}")
    bench_names()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
