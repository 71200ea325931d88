"""Conversions over the real S3 protocol: moto's server on loopback, spoken to by s3fs.

Nothing here patches s3fs: every byte goes through HTTP to the moto endpoint, so what is
checked is what a bucket would hold (multipart uploads included). The output of every S3
variant must be byte-identical to a plain local → local conversion of the same checkpoint.
"""
from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import s3fs

from .helpers import PYTHON, ROOT, cli_env, engine_convert

MiB = 1 << 20


# ---------------------------------------------------------------------------------- helpers


def fresh_fs(opts: dict, **extra) -> s3fs.S3FileSystem:
    """An s3fs instance of our own: never the product's cached one, so no shared dircache."""
    return s3fs.S3FileSystem(skip_instance_cache=True, **opts, **extra)


def visible(rel: str) -> bool:
    return not any(part.startswith(".") for part in rel.split("/"))


def local_tree(path: Path) -> dict[str, bytes]:
    """rel name → bytes of every non-hidden file under `path`."""
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_file() and visible(rel):
            out[rel] = p.read_bytes()
    return out


def s3_keys(fs: s3fs.S3FileSystem, prefix: str) -> list[str]:
    """Every object key under `prefix` (bucket/...), fresh from the server."""
    fs.invalidate_cache()
    try:
        return sorted(fs.find(prefix))
    except FileNotFoundError:
        return []


def s3_tree(fs: s3fs.S3FileSystem, prefix: str) -> dict[str, bytes]:
    """rel name → bytes of every non-hidden object under `prefix`, downloaded with `cat`."""
    base = prefix.rstrip("/") + "/"
    rels = [k[len(base):] for k in s3_keys(fs, prefix) if k.startswith(base)]
    return {rel: fs.cat(base + rel) for rel in rels if visible(rel)}


def pending_uploads(fs: s3fs.S3FileSystem, bucket: str) -> list[dict]:
    """Multipart uploads started but neither completed nor aborted."""
    return fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])


def upload_dir(fs: s3fs.S3FileSystem, local: Path, prefix: str) -> None:
    fs.put(str(local) + "/", prefix.rstrip("/") + "/", recursive=True)
    assert s3_tree(fs, prefix) == local_tree(local)


def assert_same_tree(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    assert sorted(got) == sorted(want)
    differ = [n for n in want if got[n] != want[n]]
    assert not differ, f"files differ from the local conversion: {differ}"


def assert_no_leftovers(fs: s3fs.S3FileSystem, bucket: str) -> None:
    keys = s3_keys(fs, bucket)
    assert not [k for k in keys if ".partial" in k], keys
    assert pending_uploads(fs, bucket) == []


# --------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A local → local conversion of the demo checkpoint: the bytes every S3 variant must match."""
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    base = tmp_path_factory.mktemp("reference")
    src, out = base / "fp8", base / "local-out"
    make_deepseek_v3_fp8(open_location(str(src)))
    summary = engine_convert(str(src), str(out), work=str(base / "work"), dequant=True)
    assert summary["cached_shards"] == 0
    return {"source": local_tree(src), "output": local_tree(out), "summary": summary}


@pytest.fixture
def demo(demo_ckpt, reference):
    """`demo_ckpt`, checked to be the very checkpoint the reference converted (it is seeded)."""
    assert local_tree(demo_ckpt) == reference["source"]
    return demo_ckpt


# ------------------------------------------------------------------------------ conversions


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3->s3", "local->s3", "s3->local"])
def test_convert_over_s3_matches_local(where, s3_options, demo, reference, tmp_path):
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    src_kind, dst_kind = where.split("->")
    if src_kind == "s3":
        upload_dir(fs, demo, f"{bucket}/src")
        source = f"s3://{bucket}/src"
    else:
        source = str(demo)
    dest = f"s3://{bucket}/out" if dst_kind == "s3" else str(tmp_path / "out")

    summary = engine_convert(source, dest, work=str(tmp_path / "work"), storage_options=opts, dequant=True)

    want = reference["summary"]
    assert summary["shards"] == want["shards"] > 1
    assert summary["cached_shards"] == 0
    assert summary["tensors"] == want["tensors"]
    assert summary["bytes_written"] == want["bytes_written"]
    got = s3_tree(fs, f"{bucket}/out") if dst_kind == "s3" else local_tree(tmp_path / "out")
    assert_same_tree(got, reference["output"])
    if dst_kind == "local":
        assert not [p for p in (tmp_path / "out").rglob("*") if ".partial" in p.name]
    assert_no_leftovers(fs, bucket)
    if src_kind == "s3":  # the source is read, never written
        assert s3_tree(fs, f"{bucket}/src") == reference["source"]

    if where == "s3->s3":
        # The same command again resumes from the shard records: every shard is reused,
        # which needs the S3 ETags (part of the cache key) and output sizes to read back stably.
        again = engine_convert(source, dest, work=str(tmp_path / "work"), storage_options=opts, dequant=True)
        assert again["cached_shards"] == again["shards"] == want["shards"]
        assert_same_tree(s3_tree(fs, f"{bucket}/out"), reference["output"])
        assert_no_leftovers(fs, bucket)

        # An output shard deleted behind our back, another cut short: both are rewritten even
        # though their records say done; the rest are still reused.
        shards = sorted(n for n in reference["output"] if n.endswith(".safetensors"))
        fs.rm(f"{bucket}/out/{shards[0]}")
        fs.pipe(f"{bucket}/out/{shards[1]}", reference["output"][shards[1]][:1000])
        third = engine_convert(source, dest, work=str(tmp_path / "work"), storage_options=opts, dequant=True)
        assert third["cached_shards"] == want["shards"] - 2
        assert_same_tree(s3_tree(fs, f"{bucket}/out"), reference["output"])
        assert_no_leftovers(fs, bucket)


def _mtimes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_fetch_from_s3_then_rerun_fetches_nothing(s3_options, demo, reference, tmp_path):
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    upload_dir(fs, demo, f"{bucket}/src")
    work, dest = tmp_path / "work", tmp_path / "out"
    source = f"s3://{bucket}/src"

    first = engine_convert(source, str(dest), work=str(work), storage_options=opts, fetch=True, dequant=True)
    assert first["cached_shards"] == 0
    assert_same_tree(local_tree(dest), reference["output"])

    fetched = work / "source"
    assert local_tree(fetched) == reference["source"]
    markers = fetched / ".ckptflow-fetch"
    assert sorted(p.relative_to(markers).as_posix() for p in markers.rglob("*.json")) == \
        sorted(f"{n}.json" for n in reference["source"])
    for name, data in reference["source"].items():
        record = json.loads((markers / f"{name}.json").read_text())
        assert record["name"] == name and record["size"] == len(data)
        # single-PUT objects have a plain-MD5 ETag, so the fetch verified the bytes with it
        assert set(record["verified"]) == {"md5", "size"}, record
    assert not [p for p in fetched.rglob("*") if ".partial" in p.name]

    before = _mtimes(fetched)
    second = engine_convert(source, str(dest), work=str(work), storage_options=opts, fetch=True, dequant=True)
    assert _mtimes(fetched) == before, "the second run re-fetched files"
    assert second["cached_shards"] == second["shards"] == first["shards"]
    assert_same_tree(local_tree(dest), reference["output"])
    assert_no_leftovers(fs, bucket)


@pytest.mark.slow
def test_cli_uses_fsspec_env_config(s3_endpoint, s3_options, demo, reference, tmp_path):
    """No --storage-options: the endpoint and keys come from fsspec's FSSPEC_S3_<KWARG> variables."""
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    upload_dir(fs, demo, f"{bucket}/src")

    env = cli_env(FSSPEC_S3_ENDPOINT_URL=s3_endpoint, FSSPEC_S3_KEY="testing", FSSPEC_S3_SECRET="testing",
                  PREFECT_HOME=str(tmp_path / "prefect-home"))
    # Prove the variables are what points s3fs at moto: nothing else in the environment does.
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3", "FSSPEC_CONFIG_DIR"):
        env.pop(var, None)
    env["FSSPEC_CONFIG_DIR"] = str(tmp_path / "no-fsspec-config")
    cmd = [PYTHON, "-m", "ckptflow.flows.cli", "convert", f"s3://{bucket}/src", f"s3://{bucket}/out2",
           "--dequant", "--work", str(tmp_path / "w"), "--json"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["dest"] == f"s3://{bucket}/out2"
    assert summary["shards"] == reference["summary"]["shards"]
    assert summary["cached_shards"] == 0
    assert_same_tree(s3_tree(fs, f"{bucket}/out2"), reference["output"])
    assert_no_leftovers(fs, bucket)


# -------------------------------------------------------------------------- writer and reader


def _specs_and_data(nbytes: int):
    from ckptflow.storage.safetensors_format import TensorSpec

    specs = [TensorSpec("a.weight", "F16", (nbytes // 2,)), TensorSpec("b.bias", "F32", (4,))]
    rng = np.random.default_rng(0)
    data = {"a.weight": rng.integers(0, 256, nbytes, dtype=np.uint8).tobytes(),
            "b.bias": np.arange(4, dtype=np.float32).tobytes()}
    return specs, data


@pytest.fixture
def small_blocks(s3_options):
    """Storage options with s3fs's smallest part size (5 MiB), so a few MiB use a multipart upload."""
    return {**s3_options["options"], "default_block_size": 5 * MiB}


def test_writer_abort_on_s3_leaves_nothing(s3_options, small_blocks):
    from ckptflow.storage.urls import open_location
    from ckptflow.storage.writer import SafetensorsWriter

    bucket = s3_options["bucket"]
    fs = fresh_fs(s3_options["options"])
    loc = open_location(f"s3://{bucket}/x", small_blocks)
    specs, data = _specs_and_data(12 * MiB)
    part = data["a.weight"][: 7 * MiB]  # past one 5 MiB block: a multipart upload is under way

    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(loc, "shard.safetensors", specs) as w:
            w.write("a.weight", part)
            assert len(pending_uploads(fs, bucket)) == 1, "expected the writer to stream a multipart upload"
            raise RuntimeError("boom")

    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/x/shard.safetensors")
    assert s3_keys(fs, bucket) == []
    assert pending_uploads(fs, bucket) == []


def test_writer_abort_on_s3_closes_the_file(s3_options, monkeypatch):
    from ckptflow.storage.urls import open_location
    from ckptflow.storage.writer import SafetensorsWriter

    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    loc = open_location(f"s3://{s3_options['bucket']}/x", s3_options["options"])
    specs, data = _specs_and_data(1 * MiB)
    w = SafetensorsWriter(loc, "shard.safetensors", specs)
    w.write("a.weight", data["a.weight"][:1000])
    w.abort()
    del w
    gc.collect()
    assert [f"{type(u.exc_value).__name__}: {u.exc_value}" for u in seen] == []


def test_writer_short_commit_on_s3_leaves_nothing(s3_options, small_blocks):
    from ckptflow.storage.urls import open_location
    from ckptflow.storage.writer import SafetensorsWriter

    bucket = s3_options["bucket"]
    fs = fresh_fs(s3_options["options"])
    loc = open_location(f"s3://{bucket}/x", small_blocks)
    specs, data = _specs_and_data(12 * MiB)

    w = SafetensorsWriter(loc, "shard.safetensors", specs)
    w.write("a.weight", data["a.weight"])  # b.bias never comes
    with pytest.raises(RuntimeError, match="not fully written"):
        w.commit()
    assert s3_keys(fs, bucket) == []
    assert pending_uploads(fs, bucket) == []


@pytest.mark.parametrize("nbytes", [1 * MiB, 12 * MiB], ids=["one-put", "multipart"])
def test_writer_commit_on_s3_is_visible_only_after_commit(nbytes, s3_options, small_blocks):
    from safetensors.numpy import load

    from ckptflow.storage.safetensors_format import build_header
    from ckptflow.storage.urls import open_location
    from ckptflow.storage.writer import SafetensorsWriter

    bucket = s3_options["bucket"]
    fs = fresh_fs(s3_options["options"])
    key = f"{bucket}/x/shard.safetensors"
    loc = open_location(f"s3://{bucket}/x", small_blocks)
    specs, data = _specs_and_data(nbytes)

    w = SafetensorsWriter(loc, "shard.safetensors", specs, digest=True)
    a = data["a.weight"]
    for i in range(0, len(a), 3 * MiB + 1):  # odd-sized pieces, across part boundaries
        w.write("a.weight", a[i:i + 3 * MiB + 1])
    w.write("b.bias", data["b.bias"])
    fs.invalidate_cache()
    assert not fs.exists(key), "the object is visible before commit"
    assert s3_keys(fs, bucket) == []
    assert len(pending_uploads(fs, bucket)) == (1 if nbytes > 5 * MiB else 0)

    record = w.commit()

    fs.invalidate_cache()
    assert fs.exists(key)
    body = fs.cat(key)
    assert body == build_header(specs, {"format": "pt"}) + a + data["b.bias"]
    assert record.size == len(body) and record.tensors == 2
    assert record.sha256 == hashlib.sha256(body).hexdigest()
    assert record.url == f"s3://{bucket}/x/shard.safetensors"
    loaded = load(body)  # safetensors itself reads it back
    assert loaded["a.weight"].tobytes() == a
    assert loaded["b.bias"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert s3_keys(fs, bucket) == [key]
    assert pending_uploads(fs, bucket) == []


class GetObjectCounter:
    """Counts GetObject calls and body bytes via botocore's event hooks on the s3fs client."""

    def __init__(self, fs: s3fs.S3FileSystem):
        self.calls: list[int] = []
        fs.connect()
        fs.s3.meta.events.register("after-call.s3.GetObject", self)

    def __call__(self, parsed=None, **kwargs):
        self.calls.append(int(parsed["ContentLength"]))

    @property
    def bytes(self) -> int:
        return sum(self.calls)


def _put_safetensors(fs: s3fs.S3FileSystem, key: str, tensors: dict[str, np.ndarray]) -> bytes:
    from safetensors.numpy import save

    body = save(tensors)
    fs.pipe(key, body)
    return body


def test_read_header_on_s3_reads_only_the_header(s3_options):
    from ckptflow.storage.reader import read_header
    from ckptflow.storage.safetensors_format import HEADER_PROBE_BYTES
    from ckptflow.storage.urls import open_location

    bucket = s3_options["bucket"]
    # A private s3fs instance, so the hook sees only this test's requests.
    opts = {**s3_options["options"], "skip_instance_cache": True}
    loc = open_location(f"s3://{bucket}/m", opts)
    big = np.arange(4 * MiB, dtype=np.float32)  # 16 MiB of data behind a small header
    body = _put_safetensors(loc.fs, f"{bucket}/m/big.safetensors", {"w": big, "b": np.ones(3, np.float32)})

    counter = GetObjectCounter(loc.fs)
    header = read_header(loc, "big.safetensors")
    assert set(header.tensors) == {"w", "b"}
    assert header.file_size == len(body)
    assert header.tensors["w"].nbytes == big.nbytes
    assert len(counter.calls) == 1
    assert counter.bytes <= min(HEADER_PROBE_BYTES, len(body))
    assert counter.bytes < len(body) // 50


def test_read_header_on_s3_larger_than_the_probe(s3_options):
    """A header over the 256 KiB probe: one more range read, for exactly the rest of it."""
    from ckptflow.storage.reader import read_header
    from ckptflow.storage.safetensors_format import HEADER_PROBE_BYTES, header_length
    from ckptflow.storage.urls import open_location

    bucket = s3_options["bucket"]
    opts = {**s3_options["options"], "skip_instance_cache": True}
    loc = open_location(f"s3://{bucket}/m", opts)
    tensors = {f"model.layers.{i}.mlp.experts.{i % 256}.gate_proj.weight_scale_inv": np.full(2, i, np.float32)
               for i in range(5000)}
    tensors["big"] = np.zeros(2 * MiB, np.uint8)
    body = _put_safetensors(loc.fs, f"{bucket}/m/many.safetensors", tensors)
    n = header_length("many", body[:8], len(body))
    assert 8 + n > HEADER_PROBE_BYTES

    counter = GetObjectCounter(loc.fs)
    header = read_header(loc, "many.safetensors", len(body))
    assert set(header.tensors) == set(tensors)
    assert len(counter.calls) == 2
    assert counter.bytes == 8 + n


# ------------------------------------------------------------------- regressions found by these tests


def _put_folder_marker(fs: s3fs.S3FileSystem, bucket: str, key: str) -> None:
    """A zero-byte "key/" object, as the S3 console's "Create folder" and many sync tools leave."""
    fs.call_s3("put_object", Bucket=bucket, Key=key, Body=b"")
    fs.invalidate_cache()


@pytest.mark.slow
def test_s3_folder_markers_are_not_files(s3_options, demo, reference, tmp_path):
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    upload_dir(fs, demo, f"{bucket}/src")
    _put_folder_marker(fs, bucket, "src/")
    _put_folder_marker(fs, bucket, "src/extra/")

    engine_convert(f"s3://{bucket}/src", f"s3://{bucket}/out", work=str(tmp_path / "work"),
                 storage_options=opts, dequant=True)

    objects = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix="out")["Contents"]
    keys = sorted(o["Key"] for o in objects)
    assert keys == sorted(f"out/{n}" for n in reference["output"])


def test_fetch_skips_s3_folder_markers(s3_options, demo, reference, tmp_path):
    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    upload_dir(fs, demo, f"{bucket}/src")
    _put_folder_marker(fs, bucket, "src/")

    engine_convert(f"s3://{bucket}/src", str(tmp_path / "out"), work=str(tmp_path / "work"),
                 storage_options=opts, fetch=True, dequant=True)

    assert local_tree(tmp_path / "work" / "source") == reference["source"]
    assert_same_tree(local_tree(tmp_path / "out"), reference["output"])


@pytest.mark.slow
def test_fetch_into_a_work_location_on_s3(prefect_harness, s3_options, demo, reference, tmp_path,
                                          monkeypatch):
    """On the flow: with the work location on the bucket, Prefect's own result storage writes there
    too, and must use the run's storage options like every other client."""
    from ckptflow.flows.convert import convert_flow
    from .helpers import free_port

    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = fresh_fs(opts)
    upload_dir(fs, demo, f"{bucket}/src")
    # An S3 client built without our options must fail fast, on loopback, not reach AWS.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()

    convert_flow(f"s3://{bucket}/src", f"s3://{bucket}/out", work=f"s3://{bucket}/work",
                 storage_options=opts, fetch=True, dequant=True)

    assert s3_tree(fs, f"{bucket}/work/source") == reference["source"]
    assert_same_tree(s3_tree(fs, f"{bucket}/out"), reference["output"])
