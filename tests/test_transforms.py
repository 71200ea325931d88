"""The transform registry (`tasks.plan.transforms`): every transform a planner emits is registered
and streams; dry runs and run summaries count every quantized format's weights as dequantized; the
plan, planner and run modules import without cycles, and planning never imports torch."""
from __future__ import annotations

import ast
import json
import subprocess
from io import StringIO
from pathlib import Path

import pytest
import torch

from ckptflow.flows.params import Recipe
from ckptflow.flows.recipe import plan_passes
from ckptflow.flows.demo.synthetic import (TOKENIZER_FILES, DeepSeekDims, deepseek_config, deepseek_entries,
                                           write_checkpoint)
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.urls import open_location
from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.plan.transforms import REGISTRY, Action, stream_of

from .helpers import PYTHON, ROOT, cli_env, engine_convert
from .quant_fixtures import make_gpt_oss_mxfp4, make_llama

LLAMA_SCHEMES = ("ct-fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-nvfp4", "ct-mxfp4", "modelopt-fp8",
                 "modelopt-nvfp4")
LLAMA_LINEARS = 14  # 2 layers × q, k, v, o, gate, up, down
GPT_OSS_EXPERTS = 4  # 2 layers × gate_up_proj, down_proj blocks


def deepseek(path: Path, f32: bool = False) -> Path:
    """The demo's DeepSeek-V3 FP8 layout; with `f32`, two tensors float32 under its bfloat16 config."""
    names = ("model.embed_tokens.weight", "lm_head.weight")
    groups = [[(n, torch.float32, s, (lambda m=m: m().to(torch.float32))) if f32 and n in names else (n, dt, s, m)
               for n, dt, s, m in group] for group in deepseek_entries(DeepSeekDims())]
    write_checkpoint(open_location(str(path)), groups, deepseek_config(DeepSeekDims()), TOKENIZER_FILES)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Every quantized format ckptflow reads, as a small real checkpoint, with its number of
    quantized weights counted from the files (a weight beside its scale), not from the planner."""
    root = tmp_path_factory.mktemp("formats")
    out = {"fp8-block": deepseek(root / "fp8-block"), "mxfp4": make_gpt_oss_mxfp4(root / "mxfp4")}
    out |= {s: make_llama(root / s, s) for s in LLAMA_SCHEMES}
    counted = {}
    for name, path in out.items():
        tensors = scan_checkpoint(open_location(str(path))).tensors()
        counted[name] = (path, sum(n.endswith(("_scale_inv", ".weight_scale", "_scales")) for n in tensors))
    assert counted["mxfp4"][1] == GPT_OSS_EXPERTS
    assert all(counted[s][1] == LLAMA_LINEARS for s in LLAMA_SCHEMES)
    return counted


RECIPES = [Recipe(dequant=True), Recipe(dequant=True, fix_dtypes=True), Recipe(dequant=True, reindex=True),
           Recipe(dequant=True, mp=2), Recipe(fix_dtypes=True), Recipe(reindex=True), Recipe(mp=2),
           Recipe(dequant=True, quantize="nvfp4"), Recipe(dequant=True, quantize="fp8-block")]


def test_every_transform_a_planner_emits_is_registered_and_streams(sources, tmp_path):
    """Every stage's planner, fused and as separate passes, over every format's checkpoint and one
    with float32 tensors to cast: each transform a plan names has an entry whose stream function
    imports, and every entry is one some planner emits (the registry holds no dead names)."""
    ckpts = [path for path, _ in sources.values()] + [deepseek(tmp_path / "f32", f32=True)]
    emitted: dict[str, str] = {}
    planned = 0
    for path in ckpts:
        ckpt = scan_checkpoint(open_location(str(path)))
        for recipe in RECIPES:
            for fuse in (True, False):
                try:
                    passes = plan_passes(ckpt, recipe, fuse=fuse)[0]
                except PlanError:  # e.g. MP of a packed source without --dequant: refused, nothing planned
                    continue
                planned += 1
                for p in passes:
                    emitted |= {t.transform: f"{path.name} {p.plan.stage}" for s in p.plan.shards for t in s.tensors}
    assert planned >= 40, planned
    from pathlib import Path

    from ckptflow.tasks.mcore.source import plan_megatron_core  # the Megatron-Core planner's own transform

    _, mcore = plan_megatron_core(str(Path(__file__).parent / "data" / "mcore" / "llama-gqa-tp1" / "torch_dist"))
    emitted |= {t.transform: "megatron-core" for s in mcore.plan.shards for t in s.tensors}
    unknown = {name: where for name, where in emitted.items() if name not in REGISTRY}
    assert not unknown, f"planners emit unregistered transforms: {unknown}"
    assert set(emitted) == set(REGISTRY), f"registered, never emitted: {set(REGISTRY) - set(emitted)}"
    for name, entry in REGISTRY.items():
        assert callable(stream_of(name)), entry.stream
        assert entry.action in Action.ORDER


@pytest.mark.parametrize("fmt", ["fp8-block", "mxfp4", *LLAMA_SCHEMES])
def test_dry_run_and_summary_count_quantized_weights_as_dequantized(sources, tmp_path, fmt):
    """`--dequant --dry-run` and the run's summary (its `--json` and its text) both count each
    format's quantized weights as dequantized, the same number the files hold; no format's own
    transform name (nvfp4, fp8_scaled, mxfp4_gpt_oss) shows up as a kind of work. The run is the
    engine's (`run_convert`, whose summary `convert_flow` returns as it is: test_engine.py)."""
    from ckptflow.flows.dry_run import dry_run_report
    from ckptflow.flows.preflight import plan_conversion
    from ckptflow.flows.summary_text import print_summary

    src, quantized = sources[fmt]
    out, work = tmp_path / "out", tmp_path / "work"
    report = dry_run_report(plan_conversion(open_location(str(src)), Recipe(dequant=True)), str(src), str(out),
                            str(work))
    planned = report["passes"][0]["actions"]
    assert planned["dequantized"] == quantized, planned
    assert set(planned) == {*Action.ORDER, "dropped"}, planned

    summary = engine_convert(src, out, work, dequant=True)
    assert summary["passes"][0]["actions"] == planned
    text = StringIO()
    print_summary(summary, text)
    assert f"plan:     {quantized} dequantized, " in text.getvalue(), text.getvalue()


# ---------------------------------------------------------------- imports

PACKAGES = ("tasks/plan", "tasks/planners", "tasks/run")


def _module(path: Path) -> str:
    return "ckptflow." + ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """ckptflow modules `path` imports at run time (anywhere in it: function-level imports too;
    not those under `if TYPE_CHECKING:`, which never run)."""
    tree = ast.parse(path.read_text())
    hints = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
             for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in hints:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & known


def test_plan_planner_and_run_modules_import_without_cycles():
    """No module of tasks/plan, tasks/planners, tasks/run reaches itself through imports (lazy
    ones included): the registry reaches stream functions by name, never by import."""
    paths = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py")) if p.name != "__init__.py"]
    known = {_module(p) for p in paths}
    graph = {_module(p): _imports(p, known) for p in paths}
    assert graph["ckptflow.tasks.run.quant_stream"] >= {"ckptflow.tasks.run.execute"}  # the walk sees imports

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_each_module_imports_alone_and_planning_needs_no_torch():
    """In a fresh interpreter, each module of tasks/plan, tasks/planners and tasks/run imports
    first on its own (an import-order cycle fails here); the registry, the planners, the dry run
    and inspect load without torch (planning runs before the CLI imports it)."""
    modules = [_module(p) for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py")) if p.name != "__init__.py"]
    script = f"""
import importlib, json, sys
for name in ("ckptflow.tasks.plan.transforms", "ckptflow.tasks.planners.dequant", "ckptflow.tasks.planners.mp",
             "ckptflow.tasks.plan.compose", "ckptflow.flows.dry_run", "ckptflow.flows.cli.inspect"):
    importlib.import_module(name)
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
for name in {modules!r}:
    for m in [m for m in sys.modules if m.startswith("ckptflow")]:
        del sys.modules[m]
    importlib.import_module(name)
print(json.dumps(torch))
"""
    run = subprocess.run([PYTHON, "-c", script], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout) == []
