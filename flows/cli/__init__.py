"""The `ckptflow` command line: `entry.py` (main: parse, dispatch, `error:` lines), `parser.py`
(the grammar, no Prefect or torch), one module per command (convert, watch, validate, verify,
inspect, megatron, demo, server), and what only the terminal sees: `output.py` (stdout vs stderr,
`--json`), progress bars, the quiet console log handler, the flow run's link.

`main(argv)` (a library call: returns the exit status, takes over nothing process-wide) and
`console_main()` (the `ckptflow` script and `python -m ckptflow.flows.cli`) are re-exported here.
"""
from ckptflow.flows.cli.entry import console_main, main

__all__ = ["console_main", "main"]
