"""What every command prints through: where the human text goes and the one JSON document of `--json`."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_USER_ERROR = 2


def text_out(args: argparse.Namespace) -> Any:
    """Where the human text goes: with --json, stdout holds the one JSON document (`| jq` reads
    it whole), so the text a person reads goes to stderr."""
    return sys.stderr if getattr(args, "json", False) else sys.stdout


def print_json(summary: dict[str, Any]) -> None:
    print(json.dumps({k: v for k, v in summary.items() if k != "records"}))
