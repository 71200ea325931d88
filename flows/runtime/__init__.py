"""The process runtime of a CLI run: which Prefect server it talks to (`server.py`: the
user's, the local one `ckptflow server start` keeps, or a temporary one of its own; it starts
both kinds), the local one's record, status and stop (`persistent_server.py`), where shard tasks
run (`runners.py`: threads, processes, Dask; `preloaded_pool.py`: process-pool workers forked
from a server that imported torch once), Ctrl-C / SIGTERM (`interrupt.py`), the orphan
watchdog that reaps children of a SIGKILLed CLI (`watchdog.py`) and the user folders Prefect and
the work location fall back to (`user_dirs.py`).

Nothing here converts anything; flows and the CLI use it, it imports neither.
"""
