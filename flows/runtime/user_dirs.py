"""Where ckptflow and Prefect keep their files, and what happens without a usable HOME.

Containers often run with HOME unset or naming a folder that does not exist. Prefect then fails to
create `~/.prefect`, and its temporary server dies at start-up with "Application startup failed",
seconds later. So, before Prefect is imported (it reads its settings at import), a CLI run with
no HOME and no PREFECT_HOME gives Prefect a fresh temporary home (exported, so the temporary
server and local workers share it), removes it at exit, and the summary says so. The default
work location moves from ~/.cache to a per-user folder of the temporary directory, which stays
put between runs so a rerun still resumes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ckptflow.flows.printable import printable

_temporary_prefect_home: str | None = None
_missing: str | None = None


def missing_home() -> str | None:
    """Why there is no usable home folder ("HOME is not set", …), or None when there is one."""
    home = os.environ.get("HOME")
    if not home:
        return "HOME is not set"
    if not os.path.isdir(home):
        return f"HOME ({printable(home)}) does not exist"
    return None


def cache_dir() -> str:
    """$XDG_CACHE_HOME, else ~/.cache, else (no HOME) a per-user folder of the temporary directory."""
    if os.environ.get("XDG_CACHE_HOME"):
        return os.environ["XDG_CACHE_HOME"]
    if missing_home() is None:
        return os.path.expanduser("~/.cache")
    uid = getattr(os, "getuid", lambda: "user")()
    return os.path.join(tempfile.gettempdir(), f"ckptflow-{uid}", "cache")


def fall_back_prefect_home() -> None:
    """No usable HOME and no PREFECT_HOME: point PREFECT_HOME at a fresh temporary folder.
    Must run before Prefect is imported."""
    global _temporary_prefect_home, _missing
    why = missing_home()
    if why is None or os.environ.get("PREFECT_HOME") or _temporary_prefect_home:
        return
    _temporary_prefect_home = tempfile.mkdtemp(prefix="ckptflow-prefect-home-")
    _missing = why
    os.environ["PREFECT_HOME"] = _temporary_prefect_home


def note() -> str | None:
    """The summary's line about the fallback, or None when there was none."""
    if _temporary_prefect_home is None:
        return None
    return (f"{_missing}: Prefect kept this run's records in a temporary folder, removed at exit "
            "(set HOME or PREFECT_HOME to keep them)")


def remove_temporary_prefect_home() -> None:
    """At exit: the fallback folder holds only this run's Prefect records."""
    if _temporary_prefect_home is not None:
        shutil.rmtree(_temporary_prefect_home, ignore_errors=True)


def unwritable(folder: Path) -> str | None:
    """Why no file can be created in `folder` (made if missing), or None when one can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".ckptflow-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    return None
