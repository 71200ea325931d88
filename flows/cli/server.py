"""`ckptflow server start|stop|status`: the local Prefect server kept between runs."""
from __future__ import annotations

import argparse
from typing import Any


def cmd_server(args: argparse.Namespace, runtime: Any = None) -> int:
    from ckptflow.flows.runtime import persistent_server

    if args.action in ("start", "stop") and (stale := persistent_server.forget_stale()):
        print(f"note: {stale}")
    if args.action == "start":
        url = persistent_server.start(args.port)
        print(f"local Prefect server at {url} (UI: {url.removesuffix('/api')}); ckptflow runs without "
              f"PREFECT_API_URL use it until `ckptflow server stop`")
        return 0
    if args.action == "stop":
        print("local Prefect server stopped" if persistent_server.stop() else "no local Prefect server was running")
        return 0
    url, pid = persistent_server.status()
    if url is None:
        print(f"no local Prefect server running (start one: ckptflow server start; files: {persistent_server.home()})")
        return 1
    print(f"local Prefect server at {url}, pid {pid}, files in {persistent_server.home()}")
    return 0
