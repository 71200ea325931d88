"""Run the ckptflow CLI with the given arguments and write this process's peak RSS (VmHWM, KiB)
to the file named by CKPTFLOW_HWM_FILE at exit.

Not wait4's ru_maxrss: Linux carries the parent's resident set into a child's ru_maxrss across
fork + exec, so a child of a big parent (pytest) would report the parent's peak. A run on the
temporary Prefect server leaves by `os._exit` (flows/runtime/interrupt.py), which skips `finally`: that
exit writes the file too.
Usage: python bench/measured_cli.py validate PATH
"""
import os
import runpy
import sys


def _write_hwm() -> None:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:")).split()[1]
    with open(os.environ["CKPTFLOW_HWM_FILE"], "w") as f:
        f.write(hwm)


_os_exit = os._exit


def _measured_exit(code: int) -> None:
    _write_hwm()
    _os_exit(code)


os._exit = _measured_exit
sys.argv = ["ckptflow"] + sys.argv[1:]
try:
    runpy.run_module("ckptflow.flows.cli", run_name="__main__")
finally:
    _write_hwm()
