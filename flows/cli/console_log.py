"""The terminal's view of Prefect's logs when the CLI runs without `-v`.

Flow and task runs log at INFO so the Prefect UI's Logs tab shows every run and shard, but a
plain CLI run's terminal shows the progress bars and the summary, not Prefect's chatter, and a
failed run's error is one `error:` line, not the traceback Prefect logs. Levels cannot say both
(the API handler hangs off the same run loggers whose records reach the console through the
root logger), so the console handler itself drops run records: the CLI names this class as
Prefect's console handler (`PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS`, flows/cli/). Set in the
environment, it holds in every process Prefect configures logging in: re-reads of the logging
config, process-pool and local Dask workers.
"""
from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

# The loggers of `get_run_logger()` and of Prefect's flow and task engines.
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def is_run_record(record: logging.LogRecord) -> bool:
    return any(record.name == name or record.name.startswith(name + ".") for name in RUN_LOGGERS)


class QuietRunsConsoleHandler(PrefectConsoleHandler):
    """Prefect's console handler, silent for flow- and task-run records below CRITICAL; every
    other record (a library's warning, Prefect's client) is shown as Prefect would show it."""

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if is_run_record(record) and record.levelno < logging.CRITICAL:
            return False
        return bool(super().filter(record))
