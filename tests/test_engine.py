"""The engine's entry point converts with no orchestrator: Prefect not even importable, same bytes
and summary as the flow."""
from __future__ import annotations

import json
import subprocess

import pytest

from .helpers import PYTHON, ROOT, cli_env, tree

# Runs in a fresh interpreter where any `import prefect…` fails, as on a machine without it.
ENGINE_ONLY = r'''
import importlib.abc, json, sys

class NoPrefect(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" or name.startswith("prefect."):
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, NoPrefect())
from ckptflow.flows.conversion import run_convert
from ckptflow.tasks.run.submit import ThreadSubmitter

source, dest, work, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
submitter = ThreadSubmitter(2)
try:
    summary = run_convert(source, dest, work, submitter=submitter, **options)
finally:
    submitter.close()
print(json.dumps({"summary": summary, "cached": sum(r["cached"] for r in summary["records"]),
                  "shards": len(summary["records"]),
                  "prefect_loaded": any(m == "prefect" or m.startswith("prefect.") for m in sys.modules)}))
'''


def engine(src, dest, work, **recipe) -> dict:
    proc = subprocess.run([PYTHON, "-c", ENGINE_ONLY, str(src), str(dest), str(work), json.dumps(recipe)],
                          env=cli_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [{"dequant": True}, {"dequant": True, "mp": 2}], ids=["dequant", "dequant+mp2"])
def test_the_engine_converts_without_prefect_and_matches_the_flow(prefect_harness, demo_ckpt, tmp_path, recipe):
    from ckptflow.flows.convert import convert_flow

    got = engine(demo_ckpt, tmp_path / "engine", tmp_path / "w-engine", **recipe)
    assert got["prefect_loaded"] is False and got["cached"] == 0 and got["shards"] >= 2
    flow = convert_flow(str(demo_ckpt), str(tmp_path / "flow"), work=str(tmp_path / "w-flow"), **recipe)
    assert tree(tmp_path / "engine") == tree(tmp_path / "flow")
    # The same summary: the flow returns what the engine's entry point returns.
    ours = got["summary"]
    assert ours.keys() == flow.keys()
    for key in ("stage", "shards", "cached_shards", "tensors", "source_bytes", "bytes_written", "output_bytes",
                "output_tensors", "dtypes", "nonfinite", "warnings", "notes", "passes"):
        assert ours[key] == flow[key], key
    # The engine's journal is the flow's: a rerun reuses every shard, with or without Prefect.
    again = engine(demo_ckpt, tmp_path / "engine", tmp_path / "w-engine", **recipe)
    assert again["cached"] == again["shards"] == got["shards"]
