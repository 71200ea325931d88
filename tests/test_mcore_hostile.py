"""Hostile Megatron-Core checkpoints: each is refused with one line naming the file, in bounded
memory and time, and nothing from a pickle runs."""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

from .mcore_dist import grid, write_torch_dist

W = torch.arange(48, dtype=torch.float32).reshape(4, 12)


def _ok(root: Path, **kw) -> Path:
    return write_torch_dist(root, {"decoder.layers.mlp.linear_fc2.weight": (W, grid(W.shape, (4, 2)))}, **kw)


class _Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


def _central(blob: bytes, name_end: bytes) -> list[int]:
    """Offsets of the central directory entries whose name ends with `name_end`."""
    out, at = [], blob.find(b"PK\x01\x02")
    while at >= 0:
        nlen = struct.unpack_from("<H", blob, at + 28)[0]
        if blob[at + 46:at + 46 + nlen].endswith(name_end):
            out.append(at)
        at = blob.find(b"PK\x01\x02", at + 4)
    return out


def _patch_distcp(root: Path, how) -> None:
    path = root / "__0_0.distcp"
    blob = bytearray(path.read_bytes())
    how(blob, _central(blob, b"/data/0")[0])
    path.write_bytes(bytes(blob))


def _cases(tmp: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """case → (checkpoint folder, a phrase its error must hold)."""
    cases = {}

    def case(name: str, phrase: str, **kw) -> Path:
        root = _ok(tmp / name, **kw)
        cases[name] = (root, phrase)
        return root

    root = case("os_system", "asks for posix.system")
    (root / ".metadata").write_bytes(pickle.dumps(_Evil(os.system, f"touch {marker}")))
    root = case("eval", "asks for builtins.eval")
    (root / ".metadata").write_bytes(pickle.dumps(_Evil(eval, f"open({str(marker)!r}, 'w')")))

    root = case("set_bomb", "Python sets")  # 6M empty sets from a 12 MB pickle: 1.3 GB if built
    (root / ".metadata").write_bytes(b"\x80\x04]\x94(" + b"\x8f" * 6_000_000 + b"e.")

    def huge(meta):
        meta.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"].size = torch.Size([1 << 40, 1 << 40])
    case("huge_shape", "past any real tensor", tamper=huge)

    def out_of_file(meta):
        info = next(iter(meta.storage_data.values()))
        info.length = 1 << 40
    case("chunk_past_file", "which has", tamper=out_of_file)

    def overlap(meta):  # chunk (0, 6) moved onto (0, 3), its storage entry too: a gap left behind
        key = "decoder.layers.mlp.linear_fc2.weight"
        meta.state_dict_metadata[key].chunks[1].offsets = torch.Size([0, 3])
        old = MetadataIndex(key, torch.Size([0, 6]))
        meta.storage_data[MetadataIndex(key, torch.Size([0, 3]))] = meta.storage_data.pop(old)
    case("overlap", "overlap", tamper=overlap)

    def gap(meta):
        chunks = meta.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"].chunks
        del chunks[-1]
    case("gap", "a gap", tamper=gap)

    def shared(meta):  # memo references: one list of 3000 chunks under 2000 keys, a few KB of pickle
        t = meta.state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
        t.chunks.extend(ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([1, 1])) for _ in range(3000))
        for i in range(2000):
            meta.state_dict_metadata[f"k{i}"] = t
    case("chunk_bomb", "chunks of model tensors", tamper=shared)

    def transformed(meta):
        next(iter(meta.storage_data.values())).transform_descriptors = ["zstd"]
    case("transforms", "stored with transforms", tamper=transformed)

    root = case("compressed_member", "is compressed")
    _patch_distcp(root, lambda b, at: struct.pack_into("<H", b, at + 10, 8))
    root = case("wrong_size", "holds 20 bytes, its shape [1, 6] needs 24")
    _patch_distcp(root, lambda b, at: struct.pack_into("<II", b, at + 20, 20, 20))  # 24 → 20 bytes
    root = case("payload_outside", "past the central directory")
    _patch_distcp(root, lambda b, at: struct.pack_into("<I", b, at + 42, 1 << 20))
    root = case("no_local_header", "no local header")
    _patch_distcp(root, lambda b, at: struct.pack_into("<I", b, at + 42, struct.unpack_from("<I", b, at + 42)[0] + 2))

    # Legacy: a rank file whose storage is smaller than the tensor its pickle builds on it.
    legacy = tmp / "legacy_short_storage" / "iter_0000001" / "mp_rank_00"
    legacy.mkdir(parents=True)
    args = Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, num_layers=1)
    torch.save({"args": args, "iteration": 1, "model": {"embedding.word_embeddings.weight": W}},
               legacy / "model_optim_rng.pt")
    blob = bytearray((legacy / "model_optim_rng.pt").read_bytes())
    for at in _central(blob, b"/data/0"):
        struct.pack_into("<II", blob, at + 20, 64, 64)  # 192 → 64 bytes
    (legacy / "model_optim_rng.pt").write_bytes(bytes(blob))
    cases["legacy_short_storage"] = (legacy.parent, "holds 64")
    packed = tmp / "legacy_compressed_pickle" / "iter_0000001" / "mp_rank_00"
    packed.mkdir(parents=True)
    torch.save({"args": args, "model": {"embedding.word_embeddings.weight": W}}, packed / "model_optim_rng.pt")
    blob = bytearray((packed / "model_optim_rng.pt").read_bytes())
    struct.pack_into("<H", blob, _central(blob, b"/data.pkl")[0] + 10, 8)  # says: deflated
    (packed / "model_optim_rng.pt").write_bytes(bytes(blob))
    cases["legacy_compressed_pickle"] = (packed.parent, "data.pkl is compressed")
    old_lm = tmp / "legacy_pre_core" / "iter_0000001" / "mp_rank_00"
    old_lm.mkdir(parents=True)
    torch.save({"args": args, "model": {"language_model": {"embedding": {"weight": W}}}}, old_lm / "model_optim_rng.pt")
    cases["legacy_pre_core"] = (old_lm.parent, "nested under 'language_model'")
    evil = tmp / "legacy_global" / "iter_0000001" / "mp_rank_00"
    evil.mkdir(parents=True)
    torch.save({"args": args, "model": {"w": _Evil(os.system, f"touch {marker}")}}, evil / "model_optim_rng.pt")
    cases["legacy_global"] = (evil.parent, "asks for posix.system")
    return cases


_RUNNER = r"""
import json, sys, time
from ckptflow.tasks.mcore.reader import read_mcore_index
from ckptflow.storage.errors import UserError
out = {}
for name, root in json.loads(sys.argv[1]).items():
    t = time.monotonic()
    try:
        read_mcore_index(root)
        out[name] = {"error": None}
    except UserError as exc:
        out[name] = {"error": str(exc)}
    out[name]["seconds"] = time.monotonic() - t
# VmHWM, not ru_maxrss: Linux carries the parent's (the pytest worker's) peak into a child's ru_maxrss
out["maxrss_mb"] = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1]) / 1024
print(json.dumps(out))
"""


def test_hostile_torch_dist_and_legacy(tmp_path):
    marker = tmp_path / "pwned"
    cases = _cases(tmp_path / "c", marker)
    run = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps({k: str(v[0]) for k, v in cases.items()})],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    for name, (root, phrase) in cases.items():
        err = got[name]["error"]
        assert err is not None, f"{name}: accepted"
        assert "\n" not in err and phrase in err and str(root) in err, f"{name}: {err}"
        assert got[name]["seconds"] < 5, name
    assert not marker.exists()  # nothing from the pickles ran
    assert got["maxrss_mb"] < 800, got["maxrss_mb"]  # torch alone is ~350 MB here


def test_clean_copy_of_each_case_reads(tmp_path):
    """The untampered checkpoint the hostile cases start from reads fine (so each case's error is its own)."""
    from ckptflow.storage.urls import open_location
    from ckptflow.tasks.mcore.assemble import read_region
    from ckptflow.tasks.mcore.reader import read_mcore_index

    index = read_mcore_index(str(_ok(tmp_path / "ok")))
    t = index.tensors["decoder.layers.mlp.linear_fc2.weight"]
    assert torch.equal(read_region(open_location(index.root), t), W)


def test_a_file_cannot_change_how_the_next_is_read(tmp_path):
    """BUILD may set attributes on what a GLOBAL pushed (the float32 dtype, the Size class): a
    hostile .metadata doing so is refused and the next file still reads as float32."""
    from ckptflow.tasks.mcore.dcp_metadata import parse_metadata
    from ckptflow.tasks.megatron.safe import MegatronLoadError

    def short(text: str) -> bytes:
        return b"\x8c" + bytes([len(text)]) + text.encode()

    poison = (b"\x80\x04" + short("torch") + short("float32") + b"\x93}" + short("name") + short("bfloat16")
              + b"sb" + short("torch") + short("Size") + b"\x93N}" + short("__iter__") + b"N" + b"s\x86b0.")
    with pytest.raises(MegatronLoadError, match="not a readable torch_dist .metadata"):
        parse_metadata(poison, "evil/.metadata")
    root = _ok(tmp_path / "ok")
    meta = parse_metadata((root / ".metadata").read_bytes(), "ok/.metadata")
    t = meta.tensors["decoder.layers.mlp.linear_fc2.weight"]
    assert t.dtype == "F32" and t.shape == (4, 12) and len(t.chunks) == 8


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_distcp_truncated_after_planning_fails_its_shards_and_publishes_none_of_them(tmp_path, cut):
    """A `.distcp` that shrinks between planning and reading (a copy still in flight, a sync that
    rewrote it): cut in half, the chunk range reads run past its end; cut by 10 bytes (only the
    last archive's zip directory, which no shard reads), the reads succeed and the source identity
    check before publishing refuses it. Either way one line naming the file, and no shard that read
    it is published; shards that never read it are."""
    import shutil

    from ckptflow.storage.urls import StorageError, open_location
    from ckptflow.tasks.mcore.plan import source_checkpoint
    from ckptflow.tasks.mcore.source import plan_megatron_core
    from ckptflow.tasks.run.engine import EnginePass, run_conversion

    shutil.copytree(Path(__file__).parent / "data" / "mcore" / "llama-gqa-tp1" / "torch_dist", tmp_path / "src")
    index, mp = plan_megatron_core(str(tmp_path / "src"), max_shard_size="40KB")
    src = open_location(index.root)
    ckpt = source_checkpoint(index, mp.plan, src)  # sizes and versions as the run plans them
    victim = tmp_path / "src" / "iter_0000001" / "__0_0.distcp"
    size = victim.stat().st_size
    os.truncate(victim, size // 2 if cut == "half" else size - 10)
    with pytest.raises(StorageError) as err:
        run_conversion(ckpt, [EnginePass(mp.plan)], src, open_location(str(tmp_path / "out")), str(tmp_path / "work"))
    msg = str(err.value)
    assert "\n" not in msg and str(victim) in msg, msg
    assert ("truncated" in msg) if cut == "half" else ("changed during the run" in msg and "size" in msg), msg
    untouched = {s.file for s in mp.plan.shards if victim.name not in s.source_files}
    assert untouched and len(untouched) < len(mp.plan.shards)  # the test means something both ways
    out = tmp_path / "out"
    files = [p.name for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert set(files) <= untouched, set(files) - untouched  # nothing that read the shrunken file, no temp file
