"""The commit journal: the one record of which output shards are done.

Each shard task writes `<key>.json` under the work location's `journal/` twice: just before its
file gets its final name (with the identity a rename keeps) and right after (the full identity).
A shard is reused only while its file still has that identity; a missing, empty or damaged
entry counts as absent. The flow checks before submitting, and the shard task checks again
before computing, so a resubmitted or retried task (a Dask worker lost after its commit) never
recomputes committed work.
"""
from __future__ import annotations

from typing import Any

from ckptflow.storage.files import read_json, write_json
from ckptflow.storage.urls import Location, StorageError


def reusable(journal: Location, entry: str, identity: str | None, journaled: set[str]) -> dict[str, Any] | None:
    """The journal record of a published shard that is still the very file its plan committed
    (`identity`: its `file_identity` now, None if absent), or None: write it again. A run killed
    between the rename and the final entry left the entry written before the rename; it proves
    the file too, and is completed here so the next check is a plain comparison."""
    record = read_journal(journal, entry) if entry in journaled and identity else None
    if record is None or identity is None or not proves(record, identity):
        return None
    if record.get("identity") != identity:
        record = {**record, "identity": identity}
        write_json(journal, entry, record)
    return record


def read_journal(journal: Location, entry: str) -> dict[str, Any] | None:
    """A commit journal entry, or None when it is missing, empty or damaged (a power cut can
    leave any of those): such a shard is simply written again."""
    try:
        record = read_json(journal, entry)
    except StorageError:
        return None
    if not isinstance(record, dict):
        return None
    return record if isinstance(record.get("identity") or record.get("identity_before_rename"), str) else None


def proves(record: dict[str, Any], identity: str) -> bool:
    """Does a journal entry vouch for the file whose `file_identity` is `identity`? The final entry
    names the whole identity; one written just before the rename (the run died before it could
    write the final one) names everything but the ctime the rename set."""
    if record.get("identity") is not None:
        return record["identity"] == identity
    before = record.get("identity_before_rename")
    return isinstance(before, str) and identity.rsplit(":", 1)[0] == before
