"""Megatron-Core → HF between S3 prefixes, through the CLI and a real S3 endpoint (moto).

Every request goes over HTTP through a recording proxy in front of moto (tests/test_ops.py's
FaultyProxy, with a rule that only looks), so the bytes the CLI reads from SOURCE are counted where
a bucket would see them. The bf16 fixture holds Adam state (exp_avg, exp_avg_sq: twice the model's
bytes); the tests show none of its bytes is ever requested, in either format.
"""
from __future__ import annotations

import collections
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import s3fs

from .helpers import kill_slow_cli, run_main, s3_tree, tree
from .test_mcore_convert import convert
from .test_ops import FaultyProxy

DATA = Path(__file__).parent / "data" / "mcore"
BF16 = DATA / "llama-gqa-tp1-bf16"
Range = tuple[int, int]  # [start, end)


# ------------------------------------------------------------ where the optimizer's bytes are


def _dist_optimizer_ranges(save: Path) -> dict[str, list[Range]]:
    """rel path → byte ranges of every optimizer chunk, from torch's own DCP reader of `.metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    it = next(save.glob("iter_*"))
    out: dict[str, list[Range]] = collections.defaultdict(list)
    for idx, info in FileSystemReader(str(it)).read_metadata().storage_data.items():
        if idx.fqn.startswith("optimizer."):
            out[f"{it.name}/{info.relative_path}"].append((info.offset, info.offset + info.length))
    return out


class _Stub:
    def __init__(self, *a, **k):
        pass

    def __setstate__(self, state):
        pass


class _StorageKeys(pickle.Unpickler):
    """Unpickles a legacy rank file's data.pkl with every tensor replaced by its storage key (no
    torch, nothing run): enough to tell the optimizer's records from the model's."""

    def find_class(self, module, name):
        if name == "_rebuild_tensor_v2":
            return lambda storage, *a, **k: storage
        return collections.OrderedDict if name == "OrderedDict" else _Stub

    def persistent_load(self, pid):
        return ("storage-key", pid[2])


def _keys(obj) -> set[str]:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage-key":
        return {obj[1]}
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return set().union(*map(_keys, items)) if items else set()


def _legacy_optimizer_ranges(save: Path) -> dict[str, list[Range]]:
    """rel path → byte ranges of the zip records holding optimizer tensors, in every rank file."""
    out: dict[str, list[Range]] = collections.defaultdict(list)
    for f in save.rglob("model_optim_rng.pt"):
        raw = f.read_bytes()
        with zipfile.ZipFile(f) as zf:
            pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            state = _StorageKeys(zf.open(pkl)).load()
            keys = _keys(state["optimizer"])
            assert keys and not keys & _keys(state["model"])
            for key in keys:
                info = zf.getinfo(pkl[:-len("data.pkl")] + f"data/{key}")
                start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28],
                                                                 "little") \
                    + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
                out[f.relative_to(save).as_posix()].append((start, start + info.file_size))
    return out


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture
def recorded(s3_endpoint, s3_options):
    """Storage options through a proxy that records every GET (object key, byte range)."""
    proxy = FaultyProxy(s3_endpoint)
    gets: list[tuple[str, str | None]] = []

    def record(method, headers) -> bool:  # called under the proxy's lock
        if method == "GET":
            gets.append((headers["X-Request-Path"].split("?", 1)[0], headers.get("Range")))
        return False  # never acts: every request is forwarded as it came

    proxy.add_rule(record, "ok", 1)
    bucket = s3_options["bucket"]
    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": proxy.url}}
    yield {"options": opts, "bucket": bucket, "gets": gets,
           "fs": s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"])}
    proxy.close()


def _reads(gets: list[tuple[str, str | None]], prefix: str, sizes: dict[str, int]) -> dict[str, list[Range]]:
    """rel key → the byte ranges GETs asked for under `/prefix/` (a GET without Range: all of it)."""
    out: dict[str, list[Range]] = collections.defaultdict(list)
    for path, rng in gets:
        if not path.startswith(f"/{prefix}/"):
            continue
        rel = path[len(prefix) + 2:]
        if rng is None:
            out[rel].append((0, sizes[rel]))
        else:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            out[rel].append((int(first), int(last) + 1 if last else sizes[rel]))
    return out


# `ckptflow megatron` in this process (helpers.run_main): these tests are about what it reads and
# writes, not about its process; the SIGKILLed run below is a real process.
_cli = run_main


# ------------------------------------------------------------------------------------ tests


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch_dist", "legacy"])
def test_s3_to_s3_equals_local_and_never_reads_optimizer_state(prefect_harness, recorded, fmt, tmp_path):
    save = BF16 / fmt
    bucket, fs = recorded["bucket"], recorded["fs"]
    fs.put(str(save) + "/", f"{bucket}/src/", recursive=True)
    sizes = {p.relative_to(save).as_posix(): p.stat().st_size for p in save.rglob("*") if p.is_file()}

    run = _cli("megatron", f"s3://{bucket}/src", f"s3://{bucket}/hf", "--storage-options",
               json.dumps(recorded["options"]), "--max-shard-size", "40KB", "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["shards"] > 2 and summary["cached_shards"] == 0

    convert(save, tmp_path / "local", tmp_path / "work", max_shard_size="40KB")
    assert s3_tree(fs, f"{bucket}/hf") == tree(tmp_path / "local")

    optimizer = _dist_optimizer_ranges(save) if fmt == "torch_dist" else _legacy_optimizer_ranges(save)
    opt_bytes = sum(b - a for rs in optimizer.values() for a, b in rs)
    stretches = {f: _union(rs, gap=1024) for f, rs in optimizer.items()}  # zip local headers between records
    assert max(b - a for rs in stretches.values() for a, b in rs) > WINDOW  # so the check below can fail
    reads = _reads(recorded["gets"], f"{bucket}/src", sizes)
    assert reads, recorded["gets"][:5]  # the proxy saw the CLI's reads
    for f, rs in reads.items():
        for a, b in rs:
            inside = [min(b, y) - max(a, x) for x, y in stretches.get(f, []) if a < y and x < b]
            # Planning's index reads (a chunk archive's head and tail merged over gaps < 64 KiB; a rank
            # file's 64 KiB zip-directory probe) may pass over optimizer bytes; nothing asks for them.
            assert sum(inside) < b - a, (f, (a, b))  # no GET lies wholly in optimizer state
            assert all(n <= WINDOW for n in inside), (f, (a, b), inside)
    touched = sum(min(b, y) - max(a, x) for f, rs in reads.items() for a, b in _union(rs)
                  for x, y in optimizer.get(f, []) if a < y and x < b)
    read, unique = sum(b - a for rs in reads.values() for a, b in rs), sum(b - a for rs in reads.values()
                                                                           for a, b in _union(rs))
    total = sum(sizes.values())
    # Figures (printed with -s): what was read from the bucket against the save and its Adam state.
    print(f"\n{fmt}: {sum(map(len, reads.values()))} GETs of SOURCE, {read:,} B ({unique:,} B distinct) of a "
          f"{total:,} B save; optimizer state {opt_bytes:,} B, of which {touched:,} B passed over by index "
          f"reads, none requested; HF output {summary['bytes_written']:,} B")
    assert opt_bytes > summary["bytes_written"]  # Adam's two moments: the bytes worth skipping
    assert touched < opt_bytes / 2


WINDOW = 64 << 10  # tasks/mcore/torch_dist.py MERGE_GAP, tasks/mcore/legacy.py TAIL


def _union(ranges: list[Range], gap: int = 0) -> list[Range]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


@pytest.mark.slow
def test_sigkill_mid_run_resumes_from_the_bucket(prefect_harness, s3_options, tmp_path):
    """The real CLI converting s3:// → s3:// (work location: DEST's bucket, the default), SIGKILLed
    once 2 shards are in the bucket: the rerun finds their journal entries in the bucket, reuses
    them (the objects are not written again), writes the rest, and equals an uninterrupted run."""
    save = DATA / "llama-gqa-tp1" / "torch_dist"
    bucket, opts = s3_options["bucket"], s3_options["options"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    fs.put(str(save) + "/", f"{bucket}/src/", recursive=True)
    args = ["megatron", f"s3://{bucket}/src", f"s3://{bucket}/hf", "--storage-options", json.dumps(opts),
            "--max-shard-size", "40KB", "--json"]

    def shards() -> dict[str, str]:
        """shard object → its ETag (a PUT of the same bytes gets a new LastModified, not a new ETag)."""
        fs.invalidate_cache()
        found = fs.find(f"{bucket}/hf", detail=True)
        return {k.rsplit("/", 1)[1]: (v["ETag"], v["LastModified"]) for k, v in found.items()
                if k.endswith(".safetensors")}

    # Killed once 3 shards are in the bucket. Shards commit one at a time and each is recorded in
    # the journal right after it is published, so the kill may leave the last one published without
    # its final record: the rerun computes that one again and reuses the rest.
    # Polled every 0.2 s, not 0.02: each poll is a listing served by moto's thread in this process
    # (CPU of this test's own), and a shard takes over 0.8 s (SLOW_CHILD), so the kill still lands
    # with the 4th shard not yet committed.
    kill_slow_cli(args, lambda: len(shards()) >= 3, interval=0.2)
    committed = shards()
    assert not fs.exists(f"{bucket}/hf/model.safetensors.index.json")
    assert fs.find(f"{bucket}/.ckptflow-work/hf/journal")  # the record of what is done is in the bucket

    rerun = _cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert 2 <= summary["cached_shards"] <= len(committed) < summary["shards"], (summary, committed)
    assert summary["cached_shards"] >= len(committed) - 1, (summary, committed)
    after = shards()
    reused = [n for n in committed if after[n] == committed[n]]
    assert len(reused) >= summary["cached_shards"]  # reused: not PUT again
    convert(save, tmp_path / "clean", tmp_path / "work", max_shard_size="40KB")
    assert s3_tree(fs, f"{bucket}/hf") == tree(tmp_path / "clean")
