"""A SOURCE shard changed while a conversion reads it (issue #27): the run fails with one line
naming the file, DEST keeps no shard computed from the changed bytes, and a rerun converts the
new source exactly. Through the CLI's `main`; the change is made by the CLI's own process at one
instant (its first read of the file once a shard has been published), so it is deterministic."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from ckptflow.flows.params import Recipe

from .helpers import engine_convert, run_main, tree

VICTIM = "model-00003-of-00006.safetensors"
VICTIM_MP = "model0-mp2.safetensors"  # rank 0 reads every source file too: published before the change

# Hooks on the CLI's reads: the first read of CKPTFLOW_TEST_VICTIM after DEST holds a published shard is followed
# by the change: the file is rewritten in place, or replaced by a `mv`, with size and mtime kept.
CHANGING_CLI = """
import os, sys, threading
from ckptflow.storage.reader import RangeReader
env = os.environ
victim, new, how, out = (env["CKPTFLOW_TEST_" + k] for k in ("VICTIM", "NEW", "HOW", "OUT"))
real_victim = os.path.realpath(victim)
done, lock = [], threading.Lock()
def published():
    return os.path.isdir(out) and any(n.endswith(".safetensors") and not n.startswith(".") for n in os.listdir(out))
def change():
    st, data = os.stat(victim), open(new, "rb").read()
    if how == "inplace":
        with open(victim, "r+b") as f:
            f.write(data)
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        tmp = os.path.join(os.path.dirname(victim), ".incoming")
        with open(tmp, "wb") as f:
            f.write(data)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, victim)
    done.append(1)
def hooked(real):
    def read(self, name, *a, **k):
        got = real(self, name, *a, **k)
        with lock:
            if not done and os.path.realpath(self.loc.path(name)) == real_victim and published():
                change()
        return got
    return read
RangeReader.read = hooked(RangeReader.read)
RangeReader.read_columns = hooked(RangeReader.read_columns)
"""

CASES = {"mp2": (["--dequant", "--mp", "2"], Recipe(dequant=True, mp=2), True),
         "dequant": (["--dequant"], Recipe(dequant=True), False)}


def _cli(hooks: str | None, args: list[str], **env: str) -> subprocess.CompletedProcess:
    """The CLI's `main(argv)` in this process (no torch + Prefect import per run), after `hooks`
    patch its reads; the patched methods are put back after it."""
    from ckptflow.storage.reader import RangeReader

    real = RangeReader.read, RangeReader.read_columns
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        if hooks:
            exec(hooks, {})
        return run_main(*args)
    finally:
        RangeReader.read, RangeReader.read_columns = real
        os.environ.clear()
        os.environ.update(saved)


def _clean(src, tmp_path, tag: str, recipe: Recipe, fuse: bool) -> dict[str, bytes]:
    """What a clean, uninterrupted conversion of `src` gives (the engine's passes, no Prefect)."""
    dst = tmp_path / f"clean-{tag}"
    engine_convert(src, dst, tmp_path / f"work-{tag}", fuse=fuse, **recipe.model_dump())
    return tree(dst)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["inplace", "mv"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_source_changed_mid_run_fails_and_publishes_nothing_from_new_bytes(prefect_harness, demo_ckpt, tmp_path, case,
                                                                            how):
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    flags, recipe, fuse = CASES[case]
    other = tmp_path / "other"  # the same layout, other values: VICTIM's new bytes, same size
    make_deepseek_v3_fp8(open_location(str(other)), seed=1)
    new_src = tmp_path / "new-src"
    shutil.copytree(demo_ckpt, new_src)
    shutil.copyfile(other / VICTIM, new_src / VICTIM)
    assert (new_src / VICTIM).stat().st_size == (demo_ckpt / VICTIM).stat().st_size
    old, new = _clean(demo_ckpt, tmp_path, "old", recipe, fuse), _clean(new_src, tmp_path, "new", recipe, fuse)
    weights = sorted(n for n in old if n.endswith(".safetensors"))
    assert [n for n in weights if old[n] != new[n]], "the change must show in the output"

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["convert", str(demo_ckpt), str(out), *flags, "--work", str(work)]
    run = _cli(CHANGING_CLI, args, CKPTFLOW_TEST_VICTIM=str(demo_ckpt / VICTIM),
               CKPTFLOW_TEST_NEW=str(other / VICTIM), CKPTFLOW_TEST_HOW=how, CKPTFLOW_TEST_OUT=str(out))
    assert (demo_ckpt / VICTIM).read_bytes() == (other / VICTIM).read_bytes()  # the change did happen

    text = run.stdout + run.stderr
    assert run.returncode == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    assert f"SOURCE file {demo_ckpt / VICTIM} changed during the run" in errors[0], errors[0]
    assert ("inode" if how == "mv" else "rewritten in place") in errors[0], errors[0]

    # DEST: shards published before the change (at least one: that is when the change came), none
    # after it from the changed file, no temp file, nothing that claims the checkpoint complete.
    got = tree(out)
    assert got and set(got) <= set(weights), sorted(got)
    assert all(got[n] == old[n] for n in got), [n for n in got if got[n] != old[n]]  # no mix: old only
    assert not [p for p in out.iterdir() if ".partial-" in p.name]
    if case == "mp2":  # the report: model0 from the old bytes, model1 from the new ones
        assert sorted(got) == ["model0-mp2.safetensors"] and old[VICTIM_MP] != new[VICTIM_MP]
    else:  # the victim's own output shard read it after the change
        assert VICTIM not in got and old[VICTIM] != new[VICTIM]

    rerun = _cli(None, args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert tree(out) == new  # every shard of the old bytes rebuilt from the new ones


# --- the check itself, and what a refused publish leaves: fast, no CLI ------------------------

def _write(loc, name: str, fill: int, n: int = 64) -> None:
    from ckptflow.storage.safetensors_format import TensorSpec
    from ckptflow.storage.writer import SafetensorsWriter

    with SafetensorsWriter(loc, name, [TensorSpec("w", "U8", (n,))]) as w:
        w.write("w", bytes([fill]) * n)
        w.commit()


def test_refuse_changed_names_the_file_and_how_it_changed(tmp_path):
    import os

    from ckptflow.storage.checkpoint import refuse_changed, scan_checkpoint
    from ckptflow.storage.urls import StorageError, open_location

    loc = open_location(str(tmp_path / "src"))
    for name in ("a.safetensors", "b.safetensors"):
        _write(loc, name, 1)
    other = open_location(str(tmp_path / "other"))
    _write(other, "a.safetensors", 2)
    path, new = tmp_path / "src" / "a.safetensors", (tmp_path / "other" / "a.safetensors").read_bytes()

    def fps():
        ckpt = scan_checkpoint(loc)
        return [list(ckpt.fingerprint(n)) for n in ("a.safetensors", "b.safetensors")]  # as JSON gives them

    def rewrite_in_place():
        st = path.stat()
        with open(path, "r+b") as f:
            f.write(new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    def replace():
        st = path.stat()
        tmp = tmp_path / "src" / ".incoming"
        tmp.write_bytes(new)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(tmp, path)

    for change, said in ((rewrite_in_place, r"rewritten in place: its ctime moved, mtime put back"),
                         (replace, r"replaced by another file: inode \d+ → \d+"),
                         (lambda: path.write_bytes(new + b"x"), r"size \d+ → \d+ bytes"),
                         (path.unlink, r"it is gone")):
        planned = fps()
        refuse_changed(loc, planned)  # unchanged: nothing to say
        change()
        with pytest.raises(StorageError, match=rf"^SOURCE file {path} changed during the run \({said}.*\); "
                                               r"rerun when it is no longer being written"):
            refuse_changed(loc, planned)
        if not path.exists():
            break
        refuse_changed(loc, [fp for fp in planned if fp[0] == "b.safetensors"])  # b is untouched


def test_a_refused_publish_leaves_no_file_under_any_name(tmp_path):
    from ckptflow.storage.safetensors_format import TensorSpec
    from ckptflow.storage.urls import StorageError, open_location
    from ckptflow.storage.writer import SafetensorsWriter

    def refuse(record, identity):
        raise StorageError("SOURCE file x changed during the run")

    w = SafetensorsWriter(open_location(str(tmp_path)), "out.safetensors", [TensorSpec("w", "U8", (8 << 20,))])
    w.write("w", bytes(8 << 20))
    with pytest.raises(StorageError, match="changed during the run"):
        w.commit(refuse)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temp file


def test_on_s3_a_replaced_object_is_refused_and_its_upload_never_completes(s3_options):
    import s3fs

    from ckptflow.storage.checkpoint import refuse_changed, scan_checkpoint
    from ckptflow.storage.safetensors_format import TensorSpec
    from ckptflow.storage.urls import StorageError, open_location
    from ckptflow.storage.writer import SafetensorsWriter

    opts, bucket = s3_options["options"], s3_options["bucket"]
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)  # not the product's cached instance
    src = open_location(f"s3://{bucket}/src", opts)
    _write(src, "a.safetensors", 1)
    planned = [scan_checkpoint(src).fingerprint("a.safetensors")]
    refuse_changed(src, planned)
    before = fs.cat_file(f"{bucket}/src/a.safetensors")
    fs.pipe_file(f"{bucket}/src/a.safetensors", before[:-1] + b"\x02")  # same size, new ETag
    with pytest.raises(StorageError, match=rf"^SOURCE file s3://{bucket}/src/a.safetensors changed during "
                                           r"the run \(version .* → .*\)"):
        refuse_changed(src, planned)

    # a multipart upload under way when the check refuses: aborted, no object appears
    dst = open_location(f"s3://{bucket}/out", {**opts, "default_block_size": 5 << 20})
    w = SafetensorsWriter(dst, "shard.safetensors", [TensorSpec("w", "U8", (12 << 20,))])
    w.write("w", bytes(12 << 20))
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads"), "expected a multipart upload"
    with pytest.raises(StorageError, match="changed during the run"):
        w.commit(lambda record, identity: refuse_changed(src, planned))
    fs.invalidate_cache()
    assert not fs.exists(f"{bucket}/out/shard.safetensors")
    assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
