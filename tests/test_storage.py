"""The storage seam: header range reads, the streaming writer, atomic commit, memory://."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptflow.storage.files import INDEX_NAME, index_document, list_files, read_json, write_json
from ckptflow.storage.reader import RangeReader, read_header
from ckptflow.storage.safetensors_format import TensorSpec, build_header
from ckptflow.storage.urls import StorageError, open_location, parse_storage_options
from ckptflow.storage.writer import SafetensorsWriter
from ckptflow.tasks.kernels.dtype_map import TORCH_TO_ST


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_header_read_matches_safetensors(tmp_path):
    tensors = {"b": torch.ones(3, 5, dtype=torch.bfloat16), "a": torch.arange(7, dtype=torch.int64),
               "c": torch.zeros(0, 4)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    h = read_header(open_location(str(tmp_path)), "x.safetensors")
    assert h.metadata == {"format": "pt", "k": "v"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    for name, t in tensors.items():
        info = h.tensors[name]
        assert info.shape == tuple(t.shape) and info.dtype == TORCH_TO_ST[t.dtype]
        assert raw[info.start:info.end] == bytes(as_bytes(t))


def test_header_read_is_one_small_range_read(tmp_path, monkeypatch):
    save_file({"big": torch.zeros(1024, 1024)}, tmp_path / "x.safetensors")
    loc = open_location(str(tmp_path))
    calls = []
    real = loc.fs.cat_file

    def counted(p, start=None, end=None, **k):
        calls.append((start, end))
        return real(p, start=start, end=end, **k)

    monkeypatch.setattr(loc.fs, "cat_file", counted)
    read_header(loc, "x.safetensors")
    assert len(calls) == 1 and calls[0][1] - calls[0][0] <= 256 * 1024


def test_streaming_writer_output_loads_with_safe_open(tmp_path):
    tensors = {"w": torch.randn(33, 17).to(torch.bfloat16), "f8": torch.randn(4, 4).to(torch.float8_e4m3fn),
               "empty": torch.zeros(0, 3), "i": torch.arange(5, dtype=torch.int32)}
    specs = [TensorSpec(n, TORCH_TO_ST[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    loc = open_location(str(tmp_path))
    with SafetensorsWriter(loc, "sub/out.safetensors", specs, digest=True) as w:
        for n, t in tensors.items():
            data = as_bytes(t)
            for i in range(0, len(data), 7):  # arbitrary pieces
                w.write(n, data[i:i + 7])
        record = w.commit()
    path = tmp_path / "sub" / "out.safetensors"
    assert record.size == path.stat().st_size and len(record.sha256) == 64
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for n, t in tensors.items():
            assert torch.equal(f.get_tensor(n).view(torch.uint8), t.view(torch.uint8))


def test_failed_write_leaves_no_file_under_any_name(tmp_path):
    loc = open_location(str(tmp_path))
    specs = [TensorSpec("a", "F32", (4,)), TensorSpec("b", "F32", (4,))]
    with pytest.raises(RuntimeError, match="boom"):
        with SafetensorsWriter(loc, "out.safetensors", specs) as w:
            w.write("a", bytes(16))
            assert not (tmp_path / "out.safetensors").exists()  # not visible while being written
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(loc, "out.safetensors", specs)
    w.write("a", bytes(16))
    with pytest.raises(RuntimeError, match="tensor 'b' was not fully written; nothing committed"):
        w.commit()
    assert list(tmp_path.iterdir()) == []
    w = SafetensorsWriter(loc, "out.safetensors", specs)
    with pytest.raises(RuntimeError, match="got bytes for 'b' but expected 'a'"):
        w.write("b", bytes(16))
    w.abort()


def test_memory_filesystem_round_trip():
    loc = open_location("memory://ckptflow-test/ckpt")
    specs = [TensorSpec("x", "F32", (2,))]
    w = SafetensorsWriter(loc, "m.safetensors", specs)
    w.write("x", as_bytes(torch.tensor([1.0, 2.0])))
    w.commit()
    write_json(loc, INDEX_NAME, index_document({"x": "m.safetensors"}, 8))
    assert set(list_files(loc)) == {"m.safetensors", INDEX_NAME}
    assert read_json(loc, INDEX_NAME) == {"metadata": {"total_size": 8}, "weight_map": {"x": "m.safetensors"}}
    h = read_header(loc, "m.safetensors")
    with RangeReader(loc) as r:
        x = h.tensors["x"]
        assert bytes(r.read("m.safetensors", x.start, x.end)) == bytes(as_bytes(torch.tensor([1.0, 2.0])))


def test_header_layout_is_aligned_and_parsable():
    specs = [TensorSpec("a", "BF16", (3,)), TensorSpec("b", "F32", (2, 2))]
    raw = build_header(specs, {"format": "pt"})
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % 8 == 0
    obj = json.loads(raw[8:])
    assert obj["b"]["data_offsets"] == [6, 22] and obj["__metadata__"] == {"format": "pt"}


def test_bad_storage_options_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(StorageError, match="--storage-options is not valid JSON"):
        parse_storage_options("{nope")
    with pytest.raises(StorageError, match="must be a JSON object"):
        parse_storage_options("[1]")
    with pytest.raises(StorageError, match="missing.safetensors: file not found"):
        read_header(open_location(str(tmp_path)), "missing.safetensors")


def test_transformers_loads_what_the_writer_wrote(tmp_path):
    """A real client: a tiny Llama saved through our writer loads and gives the same logits."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    loc = open_location(str(tmp_path))
    half = len(state) // 2
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-0000{i}-of-00002.safetensors"
        specs = [TensorSpec(n, TORCH_TO_ST[state[n].dtype], tuple(state[n].shape)) for n in part]
        w = SafetensorsWriter(loc, fname, specs)
        for n in part:
            w.write(n, as_bytes(state[n]))
            weight_map[n] = fname
        w.commit()
    write_json(loc, INDEX_NAME, index_document(weight_map, sum(v.numel() * v.element_size() for v in state.values())))
    cfg.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("kernel", [True, False])
def test_copy_range_in_kernel_or_by_reading(tmp_path, monkeypatch, kernel):
    import errno
    import os

    from ckptflow.storage import writeback, writer

    # small windows: the copy is cut into many kernel calls with writeback started between them
    monkeypatch.setattr(writer, "WINDOW", 256 << 10)
    started = []
    real = writeback.RollingWriteback.wrote
    monkeypatch.setattr(writeback.RollingWriteback, "wrote",
                        lambda self, total: (started.append(total), real(self, total))[1])
    if not kernel:  # e.g. across filesystems on older kernels
        def refuse(*a, **k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    payload = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "src.bin").write_bytes(payload)
    loc = open_location(str(tmp_path))
    specs = [TensorSpec("a", "U8", (100,)), TensorSpec("b", "U8", (len(payload) - 200,))]
    w = SafetensorsWriter(loc, "out.safetensors", specs)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    try:
        w.write("a", payload[:100])
        w.copy_range("b", fd, 150, len(payload) - 200)
        w.commit()
    finally:
        os.close(fd)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert bytes(f.get_tensor("b").numpy()) == payload[150:len(payload) - 50]
        assert bytes(f.get_tensor("a").numpy()) == payload[:100]
    if kernel:
        assert len(started) > 10 and started == sorted(started)


def test_rolling_writeback_flushes_as_it_goes(tmp_path):
    """Writeback of each full window starts while writing, so the final fsync has little left."""
    import os

    from ckptflow.storage.writeback import RollingWriteback

    window = 1 << 20
    fd = os.open(tmp_path / "f.bin", os.O_WRONLY | os.O_CREAT)
    data = os.urandom(5 * window + 17)
    try:
        wb = RollingWriteback(fd, window)
        for a in range(0, len(data), 300_000):
            os.write(fd, data[a:a + 300_000])
            wb.wrote(min(a + 300_000, len(data)))
        os.fsync(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == data
    if wb._on:  # Linux: every whole window before the last has been scheduled
        assert wb._started >= 4 * window


def _resident_pages(path) -> int:
    """Pages of `path` in the page cache (mincore over a read-only mapping)."""
    import ctypes
    import ctypes.util
    import mmap
    import os

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size, page = os.path.getsize(path), mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = ctypes.create_string_buffer(-(-size // page))
        try:
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


def _page_cache_drops(tmp_path) -> bool:
    """Whether this filesystem drops clean pages on POSIX_FADV_DONTNEED (ext4/xfs do; tmpfs not)."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return False
    probe = tmp_path / "probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.read(fd, 1 << 20)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    dropped = _resident_pages(probe) == 0
    probe.unlink()
    return dropped


def test_shard_reads_leave_no_source_pages_cached_but_column_slices_do(tmp_path):
    """A shard's source bytes leave the page cache once read, by buffered reads (a cast) and kernel
    copies alike, so a 700 GB conversion recycles a few windows of memory; a column slice's pages
    stay, for the MP ranks that read the other columns of the same rows. Output bytes are exact."""
    import os

    import numpy as np

    from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
    from ckptflow.tasks.run.execute import write_shard

    if not _page_cache_drops(tmp_path):
        pytest.skip("this filesystem keeps pages cached after POSIX_FADV_DONTNEED")
    src = tmp_path / "src"
    src.mkdir()
    tensors = {"copied": torch.randint(0, 255, (1024, 1024), dtype=torch.uint8),
               "cast": torch.randn(512, 1024, dtype=torch.float32)}
    save_file(tensors, src / "m.safetensors")
    fd = os.open(src / "m.safetensors", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    (src / "m.safetensors").read_bytes()  # all of it in the page cache now
    pages = _resident_pages(src / "m.safetensors")
    assert pages > 700  # ~3 MiB

    h = read_header(open_location(str(src)), "m.safetensors")
    refs = {n: SourceRef.of("m.safetensors", t) for n, t in h.tensors.items()}
    shard = ShardPlan("out.safetensors", (
        OutputTensor("copied", "U8", (1024, 1024), "copy", (refs["copied"],)),
        OutputTensor("cast", "BF16", (512, 1024), "cast", (refs["cast"],))))
    write_shard(shard, open_location(str(src)), open_location(str(tmp_path / "out")))
    with safe_open(str(tmp_path / "out" / "out.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("copied"), tensors["copied"])
        assert torch.equal(f.get_tensor("cast"), tensors["cast"].to(torch.bfloat16))
    assert _resident_pages(src / "m.safetensors") <= 4  # at most the header's and ranges' edge pages

    (src / "m.safetensors").read_bytes()
    c = h.tensors["copied"]
    with RangeReader(open_location(str(src)), drop_behind=True) as r:
        got = r.read_columns("m.safetensors", c.start, c.end, 1024, 256, 384)  # an MP rank's 1/8
    assert np.array_equal(np.frombuffer(got, np.uint8).reshape(1024, 128), tensors["copied"].numpy()[:, 256:384])
    assert _resident_pages(src / "m.safetensors") == pages


@pytest.fixture
def direct_small(monkeypatch):
    """O_DIRECT for every shard-sized write, through 64 KiB staging buffers (many hand-offs)."""
    from ckptflow.storage import direct_io

    monkeypatch.setattr(direct_io, "MIN_BYTES", 0)
    monkeypatch.setattr(direct_io, "STAGING", 64 << 10)
    return direct_io


def _write_pieces(loc, payload: bytes, src_fd: int, drop: bool = False) -> SafetensorsWriter:
    """A shard of three tensors: odd-sized writes, a kernel copy from `src_fd`, a ragged tail."""
    specs = [TensorSpec("a", "U8", (200_003,)), TensorSpec("b", "U8", (len(payload) - 300_000,)),
             TensorSpec("c", "U8", (99_997,))]
    w = SafetensorsWriter(loc, "out.safetensors", specs)
    for a in range(0, 200_003, 70_001):
        w.write("a", payload[a:min(a + 70_001, 200_003)])
    w.copy_range("b", src_fd, 200_003, len(payload) - 300_000, drop)
    w.write("c", payload[len(payload) - 99_997:])
    return w


def test_direct_io_writes_exactly_the_bytes_buffered_writing_does(tmp_path, direct_small, monkeypatch):
    """Shards written with O_DIRECT (staged, double-buffered, last block padded then truncated,
    kernel copies read into staging) are byte-identical to buffered writing; where the
    filesystem refuses O_DIRECT at open, the same bytes come buffered."""
    import os

    payload = os.urandom(1_000_000)
    (tmp_path / "src.bin").write_bytes(payload)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    files = {}
    try:
        for mode in ("direct", "buffered"):
            if mode == "buffered":
                monkeypatch.setattr(direct_small, "open_direct", lambda path: None)
            loc = open_location(str(tmp_path / mode))
            w = _write_pieces(loc, payload, fd, drop=True)
            files[mode] = w._file._sink is not None
            w.commit()
    finally:
        os.close(fd)
    direct, buffered = ((tmp_path / m / "out.safetensors").read_bytes() for m in ("direct", "buffered"))
    assert direct == buffered and direct.endswith(payload[-99_997:]) and payload[:200_003] in direct
    assert files["buffered"] is False and not list((tmp_path / "direct").glob(".*partial*"))
    if not files["direct"]:
        pytest.skip("this filesystem has no O_DIRECT: only the buffered path ran")


def test_direct_io_refused_mid_file_finishes_buffered(tmp_path, direct_small, monkeypatch):
    """A filesystem that opens O_DIRECT but refuses a write (EINVAL) gets the rest buffered:
    the file is still exact."""
    import errno
    import os

    payload = os.urandom(700_000)
    (tmp_path / "src.bin").write_bytes(payload)
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, at):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
    try:
        w = _write_pieces(open_location(str(tmp_path / "o")), payload, fd)
        if w._file._sink is None:
            pytest.skip("this filesystem has no O_DIRECT")
        w.commit()
    finally:
        os.close(fd)
    raw = (tmp_path / "o" / "out.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert raw[8 + n:] == payload[:200_003] + payload[200_003:600_003] + payload[-99_997:]
    assert len(calls) > 3


def test_direct_io_disk_full_is_one_line_and_publishes_nothing(tmp_path, direct_small):
    """ENOSPC on an O_DIRECT write, raised on the next hand-off or at commit: the same one-line
    error as buffered writing, and no file under the final name."""
    import os
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        payload = os.urandom(3_000_000)
        (tmp_path / "src.bin").write_bytes(payload)
        fd = os.open(tmp_path / "src.bin", os.O_RDONLY)
        try:
            with pytest.raises(StorageError, match=r"out.safetensors: no space left on device after .* bytes; "
                                                   r".* more bytes were needed for it\. Nothing was published"):
                w = _write_pieces(open_location(str(mnt)), payload, fd)
                try:
                    w.commit()
                except BaseException:
                    w.abort()
                    raise
        finally:
            os.close(fd)
        assert not (mnt / "out.safetensors").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_copy_only_shards_keep_copy_file_range_and_computed_ones_go_direct(tmp_path, direct_small, monkeypatch):
    """A reindex shard (whole-tensor copies, local to local) is left to copy_file_range, which
    shares extents where the filesystem can; a shard with computed bytes is written O_DIRECT."""
    from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
    from ckptflow.tasks.run.execute import write_shard

    opened = []
    real = direct_small.open_direct
    monkeypatch.setattr(direct_small, "open_direct", lambda path: (opened.append(path), real(path))[1])
    src = tmp_path / "src"
    src.mkdir()
    tensors = {"u": torch.randint(0, 255, (300, 70), dtype=torch.uint8), "f": torch.randn(40, 30)}
    save_file(tensors, src / "m.safetensors")
    h = read_header(open_location(str(src)), "m.safetensors")
    refs = {n: SourceRef.of("m.safetensors", t) for n, t in h.tensors.items()}
    copies = ShardPlan("copies.safetensors", (OutputTensor("u", "U8", (300, 70), "copy", (refs["u"],)),))
    mixed = ShardPlan("mixed.safetensors", (OutputTensor("u", "U8", (300, 70), "copy", (refs["u"],)),
                                            OutputTensor("f", "BF16", (40, 30), "cast", (refs["f"],))))
    out = open_location(str(tmp_path / "out"))
    write_shard(copies, open_location(str(src)), out)
    assert opened == []
    write_shard(mixed, open_location(str(src)), out)
    assert len(opened) == 1 and "mixed.safetensors" in opened[0]
    with safe_open(str(tmp_path / "out" / "mixed.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("u"), tensors["u"])
        assert torch.equal(f.get_tensor("f"), tensors["f"].to(torch.bfloat16))
    with safe_open(str(tmp_path / "out" / "copies.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("u"), tensors["u"])


def _takes_o_direct(path) -> bool:
    """Whether the filesystem of existing file `path` opens it with O_DIRECT (tmpfs does not)."""
    import os

    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except (AttributeError, OSError):
        return False


def _direct_reads(monkeypatch) -> list:
    """Every range `RangeReader` reads with O_DIRECT (DIRECT_MIN lowered to 1 byte), recorded."""
    from ckptflow.storage import reader

    monkeypatch.setattr(reader, "DIRECT_MIN", 1)
    direct, real = [], reader.RangeReader._read_direct

    def spy(self, name, start, end, out):
        got = real(self, name, start, end, out)
        if got is not None:
            direct.append((start, end))
        return got

    monkeypatch.setattr(reader.RangeReader, "_read_direct", spy)
    return direct


def test_direct_reads_return_exactly_the_range_at_any_alignment(tmp_path, monkeypatch):
    """Source ranges read with O_DIRECT (aligned pages around the range, the range a view into the
    buffer) are the very bytes asked for, at odd offsets and at the file's unaligned end; a buffer
    without room or alignment for it, or a filesystem refusing O_DIRECT, reads buffered; a range
    past the end of a truncated file is one clear error either way."""
    import os

    from ckptflow.tasks.run.buffers import BufferPool

    direct = _direct_reads(monkeypatch)
    data = os.urandom(3 * 4096 * 100 + 123)
    (tmp_path / "f.bin").write_bytes(data)
    takes = _takes_o_direct(tmp_path / "f.bin")
    pool = BufferPool()
    ranges = [(0, 4096), (1, 1_000_001), (4095, 8193), (len(data) - 5000, len(data)), (123, len(data)), (7, 9)]
    with RangeReader(open_location(str(tmp_path)), drop_behind=True) as r:
        for a, b in ranges:
            assert bytes(r.read("f.bin", a, b, out=pool.take(b - a + r.SLACK))) == data[a:b], (a, b)
        assert direct == (ranges if takes else [])
        unaligned = pool.take(20_000 + r.SLACK)[1:]
        assert bytes(r.read("f.bin", 5, 20_005, out=unaligned)) == data[5:20_005]
        assert bytes(r.read("f.bin", 5, 20_005, out=pool.take(20_000))) == data[5:20_005]  # no slack
        assert direct == (ranges if takes else [])
        with pytest.raises(StorageError, match="truncated"):
            r.read("f.bin", len(data) - 10, len(data) + 10, out=pool.take(20 + r.SLACK))
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    with RangeReader(open_location(str(tmp_path)), drop_behind=True) as r:
        assert bytes(r.read("f.bin", 1, 1_000_001, out=pool.take(1_000_000 + r.SLACK))) == data[1:1_000_001]
    assert direct == (ranges if takes else [])


def test_shards_read_with_o_direct_are_byte_identical(tmp_path, monkeypatch):
    """A shard of an FP8 dequant (several chunks), a cast and a copied slice, its source ranges
    read with O_DIRECT, is byte-identical to the same shard read through the page cache."""
    from ckptflow.storage.checkpoint import scan_checkpoint
    from ckptflow.tasks.plan.model import OutputTensor, ShardPlan, SourceRef
    from ckptflow.tasks.run.execute import write_shard

    g = torch.Generator().manual_seed(3)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"pad": torch.zeros(777, dtype=torch.uint8),  # every range below starts off a page
               "w": (torch.randn(300, 1000, generator=g) * 50).to(torch.float8_e4m3fn),
               "w_scale_inv": torch.rand(3, 8, generator=g) + 0.5,
               "f": torch.randn(333, 517, generator=g)}, src / "m.safetensors")
    h = scan_checkpoint(open_location(str(src))).headers["m.safetensors"].tensors
    ref = {n: SourceRef.of("m.safetensors", t) for n, t in h.items()}
    shard = ShardPlan("out.safetensors", (
        OutputTensor("w", "BF16", (300, 1000), "dequant_fp8", (ref["w"], ref["w_scale_inv"]), (("block", (128, 128)),)),
        OutputTensor("f", "BF16", (333, 517), "cast", (ref["f"],)),
        OutputTensor("rows", "F32", (100, 517), "slice", (ref["f"],), (("dim", 0), ("start", 33), ("stop", 133)))))
    monkeypatch.setattr("ckptflow.tasks.run.execute.CHUNK_BYTES", 100_000)
    write_shard(shard, open_location(str(src)), open_location(str(tmp_path / "cached")))
    direct = _direct_reads(monkeypatch)
    write_shard(shard, open_location(str(src)), open_location(str(tmp_path / "direct")))
    got = (tmp_path / "direct" / "out.safetensors").read_bytes()
    assert got == (tmp_path / "cached" / "out.safetensors").read_bytes()
    if _takes_o_direct(src / "m.safetensors"):
        assert len(direct) > 6 and any(a % 4096 for a, _ in direct)
    with safe_open(str(tmp_path / "direct" / "out.safetensors"), "pt") as f:
        from ckptflow.tasks.kernels.fp8_cpu import torch_weight_dequant
        with safe_open(str(src / "m.safetensors"), "pt") as s:
            want = torch_weight_dequant(s.get_tensor("w"), s.get_tensor("w_scale_inv"), (128, 128))
            assert torch.equal(f.get_tensor("w").view(torch.int16), want.view(torch.int16))
            assert torch.equal(f.get_tensor("rows"), s.get_tensor("f")[33:133])


def test_reads_outside_a_task_retry_hiccups_and_raise_user_errors_at_once():
    """Planning reads (small scales) get the retries a shard task gets from Prefect, and no more."""
    from ckptflow.storage.transient import with_transient_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("Connection reset by peer")
        return b"ok"

    assert with_transient_retries(flaky, delays=(0, 0, 0)) == b"ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(PermissionError):
        with_transient_retries(denied, delays=(0, 0, 0))
    assert len(calls) == 1
    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionResetError("Connection reset by peer")

    with pytest.raises(ConnectionResetError):
        with_transient_retries(down, delays=(0, 0))
    assert len(calls) == 3  # the first try and one per delay
