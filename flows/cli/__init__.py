"""The `ckptflow` command line: `entry.py` (main: parse, dispatch, `error:` lines), `parser.py`
(the grammar, no Prefect or torch), one module per command (convert, watch, validate, verify,
inspect, megatron, demo, server), and what only the terminal sees: `output.py` (stdout vs stderr,
`--json`), progress bars, the quiet console log handler, the flow run's link.

`main` is re-exported here: the `ckptflow` script and `python -m ckptflow.flows.cli` run it.
"""
from ckptflow.flows.cli.entry import main

__all__ = ["main"]
