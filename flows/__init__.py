"""Prefect flows — the recipes a user runs (`convert.py`, `watch.py`, `megatron.py`), thin over the
engine (`ckptflow.tasks.run.engine`) — and what only they use: the options schema (`params.py`),
planning before a run (`preflight.py`, `recipe.py`), the Prefect submitter (`passes.py`), run
artifacts (`report.py`), the dry run report, the work location.

Subpackages: `cli/` (the `ckptflow` command line), `runtime/` (a CLI process's servers, task
runners, signals, watchdog), `demo/` (synthetic checkpoints for the demo, tests and benches).
"""
