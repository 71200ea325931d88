"""The runtime of one ckptflow process: built once by the CLI and passed down, never a global.

It holds what the flows and the engine need from the process that runs them: the Prefect
server handle (`Server`), the interrupt policy (`Interrupt`: armed only in the CLI's own process),
the progress sinks of its conversions (one per conversion: two at once never mix counts), the
terminal's verbosity, the clock `time:` counts from, and the plan the CLI made before Prefect
started (so the flow does not read every header again).

Flows take it as their `runtime` parameter, in-process only: typed `RuntimeParameter`
(ckptflow.flows.params), it has no property in a deployment's parameter schema, so the UI's run
form never offers it. Prefect records a flow's parameters with FastAPI's `jsonable_encoder` and
stores `"<Runtime>"` for a value it cannot encode (its documented fallback for unserialisable
parameters); `__slots__` without `__iter__` is what makes this object one of those, so neither
the plan (for DeepSeek-V3, every tensor of 163 headers) nor a process handle ever goes to the
server. Pickled (a process pool or Dask ships the flow run's context to its workers) it becomes a
default `Runtime()`; copied, it stays itself.

A deployment run, or any run not started by the CLI, has no runtime: the flow makes a default
one (Prefect's settings choose the server, no handlers, no bars) and plans for itself.
"""
from __future__ import annotations

import threading
import time
from typing import Any

from ckptflow.tasks.run.progress import ProgressSink

from ckptflow.flows.runtime.interrupt import Interrupt
from ckptflow.flows.runtime.server import Server


class Runtime:
    """See the module's docstring. `owns_process`: this is the `ckptflow` process itself (arm
    the handlers, start a temporary server, leave without Prefect's teardown)."""

    __slots__ = ("verbose", "started", "owns_process", "server", "interrupt", "plan", "progress", "watchdog",
                 "_sinks", "_lock")

    def __init__(self, verbose: bool = False, started: float | None = None, owns_process: bool = False) -> None:
        self.verbose = verbose
        self.started = time.monotonic() if started is None else started
        self.owns_process = owns_process
        self.server = Server()
        self.interrupt = Interrupt(self.server, self.counts, self.clear_bars)
        self.plan: Any = None                    # the CLI's plan for its one conversion: a Preflight, or
        #                                          Megatron-Core's (arguments, index, plan)
        self.progress: ProgressSink | None = None  # that conversion's sink (with the terminal's bars)
        self.watchdog: Any = None                # the orphan watcher of a CLI process, kept alive
        self._sinks: list[ProgressSink] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Runtime(owns_process={self.owns_process}, server={self.server.label()})"

    @property
    def handles_ctrl_c(self) -> bool:
        """This CLI process stops the run on Ctrl-C (armed) and its orphan watchdog ends local
        workers: they may leave Ctrl-C to it (`runners.make_task_runner(cli_interrupt=)`). Where
        no watchdog runs (no /proc), a worker that ignored Ctrl-C would outlive the CLI."""
        return self.interrupt.armed and self.watchdog is not None

    # Process pools and Dask pickle the flow run's context, parameters included, for their workers;
    # a runtime belongs to its process: a worker gets a default one (it never uses it).
    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (Runtime, ())

    def __copy__(self) -> Runtime:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> Runtime:
        return self

    def new_progress(self, bytes_bar: Any = None, shards_bar: Any = None) -> ProgressSink:
        """A sink for one more conversion, counted in what an interrupt reports."""
        sink = ProgressSink(bytes_bar, shards_bar)
        with self._lock:
            self._sinks.append(sink)
        return sink

    def progress_for_flow(self) -> ProgressSink:
        """The sink a flow's conversion counts on: the CLI's (it holds the bars) the first time,
        a fresh one for every other conversion (each of a watch run's)."""
        with self._lock:
            sink, self.progress = self.progress, None
        return sink if sink is not None else self.new_progress()

    def counts(self) -> tuple[int, int]:
        """(shards committed, shards planned) over every conversion of this process."""
        with self._lock:
            sinks = list(self._sinks)
        return sum(s.done for s in sinks), sum(s.total for s in sinks)

    def clear_bars(self) -> None:
        for sink in list(self._sinks):
            sink.clear_bars()

    def call(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Run a flow (or anything) as the interrupt policy wants it run (`Interrupt.call`)."""
        return self.interrupt.call(fn, *args, **kwargs)

    def leave(self, code: int) -> int:
        """The exit status, or no return at all (`Interrupt.leave`) in the CLI's own process."""
        return self.interrupt.leave(code)


def runtime_of(value: Any) -> Runtime:
    """A flow's `runtime` parameter as a `Runtime`: None (a deployment run, a script) is a default
    one; anything else (a value typed into a deployment's form) is refused."""
    if value is None:
        return Runtime()
    if not isinstance(value, Runtime):
        from ckptflow.storage.errors import UserError

        raise UserError("the flow parameter 'runtime' is set only by the ckptflow CLI in its own process; "
                        "leave it empty")
    return value
