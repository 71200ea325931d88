"""`ckptflow`'s entry point: parse, pick the command's handler (one module per command beside
this one), and turn user errors into `error:` lines.

User errors (bad input, missing files, unconvertible tensors) end in `error: …` lines naming
the file or tensor and a non-zero exit, never a traceback; `--verbose` shows Prefect's logs.
"""
from __future__ import annotations

# ruff: noqa: E402
# (imports below the clock: it must start before them)
import time

# The CLI's own start, what `time:` counts from: /proc's process start would add whatever ran in
# the process before it exec'd us (`bash -c "sleep 3 && exec ckptflow …"` counted the sleep).
_STARTED = time.monotonic()

import os
import sys

# Each command's module imports Prefect and torch only inside its handler: --help stays instant.
from ckptflow.flows.cli.convert import cmd_convert
from ckptflow.flows.cli.demo import cmd_demo
from ckptflow.flows.cli.inspect import cmd_inspect
from ckptflow.flows.cli.megatron import cmd_megatron
from ckptflow.flows.cli.output import EXIT_USER_ERROR
from ckptflow.flows.cli.parser import build_parser, non_utf8_argument  # no Prefect, no torch
from ckptflow.flows.cli.server import cmd_server
from ckptflow.flows.cli.validate import cmd_validate
from ckptflow.flows.cli.verify import cmd_verify
from ckptflow.flows.cli.watch import cmd_watch
from ckptflow.flows.runtime.process import Runtime



def _quiet_prefect(verbose: bool) -> None:
    # Must run before prefect is imported: settings are read at import time.
    level = os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    # Flow and task runs send INFO to the API (the UI's Logs tab) whatever the terminal shows.
    # Prefect re-reads its logging config more than once (and in each worker process), so this
    # goes through its environment overrides.
    for logger in ("FLOW_RUNS", "TASK_RUNS"):
        os.environ.setdefault(f"PREFECT_LOGGING_LOGGERS_PREFECT_{logger}_LEVEL",
                              "DEBUG" if level.upper() == "DEBUG" else "INFO")
    if not verbose:
        # Prefect logs a failing run's traceback; for user errors our one-line message is the
        # report, and warnings reach the user through the summary: the console drops run records.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_CLASS",
                              "ckptflow.flows.cli.console_log.QuietRunsConsoleHandler")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Prefect's telemetry notice would print between the progress bars; a user's own choice stands.
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # The embedded server's telemetry needs the internet; without it, it logs an error at exit.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A fresh PREFECT_HOME runs database migrations first; on a small, busy machine the
    # temporary server can need more than Prefect's default 20 s to come up.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _is_parameter_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return True
    # Only Prefect raises its ParameterTypeError: where Prefect was never imported (every refusal
    # before a flow starts), importing it to ask would cost a second of CPU for nothing.
    exceptions = sys.modules.get("prefect.exceptions")
    return exceptions is not None and isinstance(exc, exceptions.ParameterTypeError)


def _parameter_problems(exc: BaseException) -> str:
    """One `name: what is wrong` per bad value, from a pydantic or a Prefect parameter error."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        lines = [line.strip(" -") for line in str(exc).splitlines()[1:] if line.strip()]
        return "; ".join(lines) or str(exc)
    from ckptflow.flows.params import ConvertOptions, flag_of

    out = []
    for e in errors():
        field = ConvertOptions.model_fields.get(str(e["loc"][-1]))
        # a field of the options is named as the flag that sets it
        name = flag_of(str(e["loc"][-1]), field).name if field is not None else ".".join(map(str, e["loc"]))
        if e["type"] == "string_pattern_mismatch" and field is not None and field.description:
            what = field.description.split(": ", 1)[-1] if field.description.startswith("--") else field.description
            out.append(f"{name}: {e.get('input')!r} is not valid ({what})")
        else:
            out.append(f"{name}: {e['msg']}")
    return "; ".join(out)


HANDLERS = {"convert": cmd_convert, "watch": cmd_watch, "verify": cmd_verify, "megatron": cmd_megatron,
            "validate": cmd_validate, "inspect": cmd_inspect, "demo": cmd_demo, "server": cmd_server}

# Commands that start Prefect (and so a temporary server, maybe worker processes).
_STARTS_PREFECT = {"convert", "watch", "megatron", "demo", "verify"}


def main(argv: list[str] | None = None) -> int:
    """Run one `ckptflow` command in this process, as a library call (tests, scripts, notebooks):
    `argv` defaults to `sys.argv[1:]`, and `main()` and `main(argv)` behave the same. Prefect's
    logging is configured, but nothing process-wide is taken over: no signal handlers, no orphan
    watchdog, no temporary server of ckptflow's own (Prefect's settings choose the server), and
    the exit status is returned. `time:` counts from this call."""
    return _main(argv, Runtime(started=time.monotonic()))


def console_main() -> int:
    """The `ckptflow` script and `python -m ckptflow.flows.cli`: the process is ckptflow's own.
    A command that starts Prefect arms Ctrl-C / SIGTERM (one line, exit 130 / 143, within a
    second), starts the orphan watchdog and, with no server configured, a temporary server; the
    process leaves without Prefect's slow teardown of that server, and after a flow run on any
    other server without the interpreter's final clean-up (flows/runtime/interrupt.py). `time:`
    counts from this module's import (a shell's earlier work, `bash -c "sleep 3 && exec ckptflow …"`,
    is not counted)."""
    runtime = Runtime(started=_STARTED, owns_process=True)
    code = _main(None, runtime)
    from ckptflow.flows.runtime import user_dirs

    user_dirs.remove_temporary_prefect_home()
    return runtime.leave(code)


def _main(argv: list[str] | None, runtime: Runtime) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runtime.verbose = args.verbose  # set once, here; everything below reads the runtime
    if (problem := non_utf8_argument(parser, args)) is not None:  # before anything hashes or sends it
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    _quiet_prefect(runtime.verbose)
    from ckptflow.storage.errors import UserError
    from ckptflow.storage.faults import explain

    if args.command in _STARTS_PREFECT and runtime.owns_process:
        from ckptflow.flows.runtime import user_dirs, watchdog

        user_dirs.fall_back_prefect_home()  # no HOME: Prefect, imported later, gets a temporary one
        runtime.watchdog = watchdog.start()
        runtime.interrupt.arm()  # Ctrl-C / SIGTERM: one line, exit 130 / 143, within a second
    try:
        return HANDLERS[args.command](args, runtime)
    except UserError as exc:
        if runtime.verbose:
            raise
        lines = str(exc).splitlines() or [type(exc).__name__]
        print(f"error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        if runtime.verbose:
            raise
        if _is_parameter_error(exc):
            print(f"error: invalid option: {_parameter_problems(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        line = explain(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # only where the handlers are not armed (main(argv) from Python)
        from ckptflow.flows.runtime.interrupt import message

        print(message(runtime.counts()), file=sys.stderr)
        return 130

