"""Hostile headers and checkpoint JSON: refused as strictly as safetensors, at bounded cost, in one line.

Each strictness case is run through our parser and through the `safetensors` package on the same
bytes: both must refuse, or both accept (two cases where we are deliberately stricter say so).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ckptflow.storage.safetensors_format as fmt
from ckptflow.storage.checkpoint import scan_checkpoint
from ckptflow.storage.errors import UserError
from ckptflow.storage.files import MAX_JSON_BYTES, read_json
from ckptflow.storage.safetensors_format import MAX_TENSORS_PER_FILE, HeaderError, parse_header
from ckptflow.storage.urls import open_location
from ckptflow.tasks.validate import Problem, header_problems

from .helpers import PYTHON, ROOT, cli_env, run_main

ENTRY = '{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


def st_bytes(header: str | bytes, data_len: int) -> bytes:
    body = header.encode() if isinstance(header, str) else header
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + b"\0" * data_len


def we_refuse(raw: bytes) -> str | None:
    """Our verdict: the parse error, or the first error `validate` finds in the header; None if fine."""
    try:
        h = parse_header("m.safetensors", raw, len(raw))
    except HeaderError as exc:
        return str(exc)
    errors = [str(p) for p in header_problems(h) if p.severity == "error"]
    return errors[0] if errors else None


def safetensors_refuses(raw: bytes) -> bool:
    with tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False) as f:
        f.write(raw)
    try:
        # safe_open parses and checks the whole header (JSON, dtypes, shapes, offsets) as it opens;
        # listing its keys after that checks nothing more, and for the 1.75M-tensor header below
        # cost as much again (3.5 CPU-s) as the open itself.
        with safe_open(f.name, "np"):
            pass
        return False
    except Exception:  # safetensors raises SafetensorError (and others) for a bad header
        return True
    finally:
        os.unlink(f.name)


def entry(shape: str = "[1]", offsets: str = "[0,4]", dtype: str = '"F32"', extra: str = "") -> str:
    return '{"x":{"dtype":%s,"shape":%s,"data_offsets":%s%s}}' % (dtype, shape, offsets, extra)


# name: (header JSON, data bytes, words our refusal must contain; None where both accept)
CASES = {
    "valid": ('{"x":%s}' % ENTRY, 4, None),
    "offset_10_30": (entry(offsets=f"[0,{10**30}]"), 4, "data_offsets must be two integers"),
    "offset_2_64": (entry("[0]", f"[{2**64},{2**64}]", '"U8"'), 0, "data_offsets must be two integers"),
    "lone_surrogate_name": ('{"\\udc80":%s}' % ENTRY, 4, "lone UTF-16 surrogate"),
    "lone_surrogate_ignored_field": (entry(extra=',"note":"\\ud800"'), 4, "lone UTF-16 surrogate"),
    "surrogate_pair_name": ('{"\\ud83d\\ude00":%s}' % ENTRY, 4, None),
    "float_dim": (entry("[16.9]"), 4, "dim 0 is 16.9"),
    "whole_float_dim": (entry("[1.0]"), 4, "dim 0 is 1.0"),
    "exponent_dim": (entry("[1e0]"), 4, "dim 0 is 1.0"),
    "negative_zero_dim": (entry("[-0]"), 4, "dim 0 is -0.0"),
    "string_dim": (entry('["1"]'), 4, "a string"),
    "bool_dim": (entry("[true]"), 4, "a boolean"),
    "null_dim": (entry("[null]"), 4, "dim 0 is None"),
    "negative_dim": (entry("[-1]"), 4, "dim 0 is -1"),
    "infinity_dim": (entry("[Infinity]"), 4, "Infinity, which is not JSON"),
    "nan_dim": (entry("[NaN]"), 4, "NaN, which is not JSON"),
    "nan_in_ignored_field": (entry(extra=',"note":NaN'), 4, "NaN, which is not JSON"),
    "duplicate_field": ('{"x":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', 4, "twice"),
    "float_offset": (entry(offsets="[0,4.0]"), 4, "data_offsets must be two integers"),
    "three_offsets": (entry(offsets="[0,4,4]"), 4, "data_offsets must be two integers"),
    "shape_not_list": (entry(shape='{"a":1}'), 4, "shape must be a list"),
    "entry_not_object": ('{"x":5}', 0, "needs dtype, shape, data_offsets"),
    "list_header": ("[%s]" % ENTRY, 4, "header is not a JSON object (it is a list)"),
    "invalid_utf8": (b'{"\xff":' + ENTRY.encode() + b"}", 4, "not UTF-8"),
    "utf8_encoded_surrogate": (b'{"\xed\xb2\x80":' + ENTRY.encode() + b"}", 4, "not UTF-8"),
    "nul_padding": ('{"x":%s}\0\0\0' % ENTRY, 4, "not valid JSON"),
    "metadata_int_value": ('{"__metadata__":{"a":1},"x":%s}' % ENTRY, 4, "maps to an integer"),
    "metadata_null_value": ('{"__metadata__":{"a":null},"x":%s}' % ENTRY, 4, "maps to null"),
    "metadata_list": ('{"__metadata__":[],"x":%s}' % ENTRY, 4, "__metadata__ is not a JSON object"),
    "metadata_false": ('{"__metadata__":false,"x":%s}' % ENTRY, 4, "__metadata__ is not a JSON object"),
    "metadata_null": ('{"__metadata__":null,"x":%s}' % ENTRY, 4, None),
    "numel_overflows_before_zero": (entry(f"[{2**63},4,0]", "[0,0]"), 0, "2**64 elements"),
    "numel_2_62_times_zero": (entry(f"[{2**62},0]", "[0,0]"), 0, None),
    "bits_overflow_f32": (entry(f"[{2**60}]", "[0,0]"), 0, "2**64 bits"),
    "bits_overflow_u8": (entry(f"[{2**62}]", "[0,0]", '"U8"'), 0, "2**64 bits"),
    "dim_2_64": (entry(f"[{2**64},0]", "[0,0]", '"U8"'), 0, "dims are integers from 0 to 2**64 - 1"),
    "dim_2_64_minus_1_times_zero": (entry(f"[{2**64 - 1},0]", "[0,0]", '"U8"'), 0, None),
    "unknown_dtype": (entry(dtype='"F12"'), 4, "unknown dtype 'F12'"),
    "trailing_bytes": ('{"x":%s}' % ENTRY, 8, "trailing bytes"),
    "extra_field": (entry(extra=',"note":1.5'), 4, None),
    "escaped_key": ('{"x":{"dtype":"F32","shape":[1],"data\\u005foffsets":[0,4]}}', 4, None),
    "leading_space": (' {"x":%s}' % ENTRY, 4, None),
    "empty_name": ('{"":%s}' % ENTRY, 4, None),
    "empty_header": ("{}", 0, None),
    "thousand_dims_of_one": (entry("[%s]" % ",".join(["1"] * 1000)), 4, None),
}
# safetensors 0.8 silently keeps the last of two same-named tensors (or metadata keys); another
# reader may keep the first, so which bytes a name means is ambiguous: we refuse.
STRICTER = {
    "duplicate_tensor": ('{"x":%s,"x":%s}' % (ENTRY, ENTRY), 4, "has the key 'x' twice"),
    "duplicate_metadata_key": ('{"__metadata__":{"a":"b","a":"c"},"x":%s}' % ENTRY, 4, "has the key 'a' twice"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parse_header_refuses_what_safetensors_refuses(case):
    header, data_len, why = CASES[case]
    raw = st_bytes(header, data_len)
    ours, theirs = we_refuse(raw), safetensors_refuses(raw)
    assert (ours is not None) == theirs, (case, ours, theirs)
    if why is not None:
        assert why in ours and ours.startswith("m.safetensors: ") and len(ours) <= 400, ours


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_duplicate_keys_are_refused_though_safetensors_keeps_the_last(case):
    header, data_len, why = STRICTER[case]
    raw = st_bytes(header, data_len)
    assert not safetensors_refuses(raw)
    ours = we_refuse(raw)
    assert ours is not None and why in ours and "ambiguous" in ours


def test_accepted_headers_read_the_same_as_safetensors(tmp_path):
    tensors = {"w": torch.ones(3, 5, dtype=torch.bfloat16), "z": torch.zeros(0, 7), "s": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "a.safetensors", metadata={"format": "pt", "note": "é\u2028"})
    raw = (tmp_path / "a.safetensors").read_bytes()
    h = parse_header("a.safetensors", raw, len(raw))
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert h.metadata == f.metadata()
        for name in f.keys():
            t = f.get_tensor(name)
            assert h.tensors[name].shape == tuple(t.shape)
            assert raw[h.tensors[name].start:h.tensors[name].end] == t.reshape(-1).view(torch.uint8).numpy().tobytes()


def test_a_huge_malformed_entry_is_quoted_in_under_200_characters():
    dims = ",".join(["1"] * 1_000_000) + ",16.9"  # 2 MB of shape, within the structure budget
    raw = st_bytes(entry(f"[{dims}]").replace('"x"', '"' + "n" * 100_000 + '"'), 4)
    msg = we_refuse(raw)
    assert "has a malformed entry" in msg and "dim 1000000 is 16.9" in msg
    assert len(msg) < 400 and "n" * 200 not in msg


def test_a_52m_element_shape_is_refused_from_its_length_alone():
    prefix = struct.pack("<Q", 104_000_008)  # 52 M dims of "1,": over safetensors' 100 MB too
    with pytest.raises(HeaderError, match="header length 104000008 is implausible"):
        parse_header("m.safetensors", prefix, 200_000_000)


def test_a_5m_element_shape_is_refused_by_counting_before_parsing(monkeypatch):
    raw = st_bytes(entry("[%s]" % ",".join(["1"] * 5_000_000)), 4)
    monkeypatch.setattr(fmt, "loads", lambda *a, **k: pytest.fail("parsed a header the counts refuse"))
    with pytest.raises(HeaderError, match=r"list items \(',' and '\['\), more than the \d+ allowed") as err:
        parse_header("m.safetensors", raw, len(raw))
    assert len(str(err.value)) < 400


def test_too_many_tensors_is_refused_before_parsing(monkeypatch):
    n = MAX_TENSORS_PER_FILE + 2000
    raw = st_bytes("{" + ",".join('"%x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i
                                  for i in range(n)) + "}", 0)
    monkeypatch.setattr(fmt, "loads", lambda *a, **k: pytest.fail("parsed a header the counts refuse"))
    with pytest.raises(HeaderError, match=f"up to {n} tensor entries.*at most {MAX_TENSORS_PER_FILE} tensors"):
        parse_header("m.safetensors", raw, len(raw))


def test_exactly_the_per_file_cap_is_read_and_one_more_is_not():
    def header(n: int) -> bytes:
        return st_bytes("{" + ",".join('"%x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i
                                       for i in range(n)) + "}", 0)

    raw = header(MAX_TENSORS_PER_FILE)
    assert len(parse_header("m.safetensors", raw, len(raw)).tensors) == MAX_TENSORS_PER_FILE
    raw = header(MAX_TENSORS_PER_FILE + 1)  # passes the byte counts (they leave slack), not the count
    with pytest.raises(HeaderError, match=f"header has {MAX_TENSORS_PER_FILE + 1} tensors"):
        parse_header("m.safetensors", raw, len(raw))


def test_a_long_tensor_name_prints_as_a_short_line():
    p = Problem("m.safetensors", "data overlaps the previous tensor's bytes", "x" * 10_000_000)
    assert len(str(p)) <= 380 and str(p).startswith("m.safetensors: tensor 'xxx")


def test_many_problems_in_one_file_are_listed_up_to_a_cap():
    n = 5000
    raw = st_bytes("{" + ",".join('"t%d":{"dtype":"F12","shape":[1],"data_offsets":[0,0]}' % i
                                  for i in range(n)) + "}", 0)
    problems = header_problems(parse_header("m.safetensors", raw, len(raw)))
    assert len(problems) == 101 and problems[-1].message == f"… and {n - 100} more problem(s) not listed"


# ---------------------------------------------------------------- checkpoint JSON files, via the CLI


def good(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({"a.weight": torch.ones(4, 4)}, path / "m-1.safetensors")
    save_file({"b.weight": torch.ones(2, 3, dtype=torch.bfloat16)}, path / "m-2.safetensors")
    (path / "config.json").write_text(json.dumps({"torch_dtype": "float32", "rope_theta": float("inf")}))
    write_index(path, {"metadata": {"total_size": 64 + 12},
                       "weight_map": {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors"}})
    return path


def write_index(path: Path, doc: object, raw: str | None = None) -> None:
    (path / "model.safetensors.index.json").write_text(raw if raw is not None else json.dumps(doc))


def digests(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def validate(path: Path) -> subprocess.CompletedProcess:
    """`ckptflow validate PATH` in this process (helpers.run_main): what it refuses and prints."""
    return run_main("validate", str(path))


INDEX = "model.safetensors.index.json"
WM = {"a.weight": "m-1.safetensors", "b.weight": "m-2.safetensors"}
JSON_CASES = {
    "index_deeply_nested": (INDEX, '{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper"),
    "config_deeply_nested": ("config.json", '{"a": ' + '{"b": ' * 100_000 + "1" + "}" * 100_001, "nested deeper"),
    "total_size_a_string": (INDEX, json.dumps({"metadata": {"total_size": "abc"}, "weight_map": WM}),
                            '"metadata.total_size" must be a whole number of bytes, got \'abc\''),
    "weight_map_a_list": (INDEX, json.dumps({"weight_map": list(WM)}),
                          '"weight_map" must be an object of tensor name → file name, got a list'),
    "weight_map_value_a_number": (INDEX, json.dumps({"weight_map": {"a.weight": 1}}),
                                  "'a.weight' maps to an integer"),
    "index_a_list": (INDEX, json.dumps([WM]), 'must be an object with "weight_map" and "metadata", got a list'),
    "index_infinity": (INDEX, '{"metadata": {"total_size": Infinity}, "weight_map": %s}' % json.dumps(WM),
                       "contains Infinity, which is not JSON"),
    "index_duplicate_key": (INDEX, '{"weight_map": %s, "weight_map": {}}' % json.dumps(WM), "twice"),
    "index_metadata_a_list": (INDEX, json.dumps({"metadata": [76], "weight_map": WM}),
                              '"metadata" must be an object'),
    "index_not_json": (INDEX, '{"weight_map": ', "not valid JSON"),
    "config_a_list": ("config.json", json.dumps([{"torch_dtype": "float32"}]), "must be a JSON object"),
    "config_quantization_a_list": ("config.json", json.dumps({"quantization_config": [128, 128]}),
                                   '"quantization_config" must be an object, got [128, 128] (a list)'),
    "config_model_type_a_list": ("config.json", json.dumps({"model_type": ["llama"]}), '"model_type" must be a string'),
    "config_empty_lists": ("config.json", "[" + "[]," * 2_000_000 + "[]]", "list items"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_malformed_checkpoint_json_is_one_error_line_before_anything(tmp_path, case):
    name, text, why = JSON_CASES[case]
    ckpt = good(tmp_path / "ckpt")
    (ckpt / name).write_text(text)
    before = digests(ckpt)
    run = validate(ckpt)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {ckpt / name}: ") and why in lines[0], lines
    assert max(len(line) for line in lines) <= 400
    assert digests(ckpt) == before


def test_a_good_checkpoint_still_validates_and_config_may_hold_infinity(tmp_path):
    run = validate(good(tmp_path / "ckpt"))
    assert run.returncode == 0 and "ok — 2 file(s), 2 tensors" in run.stdout, run.stderr


def test_read_json_is_bounded_in_size(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"a": "' + b"x" * MAX_JSON_BYTES + b'"}')
    with pytest.raises(UserError, match="config.json: larger than 64 MiB"):
        read_json(open_location(str(tmp_path)), "config.json")


def test_scan_refuses_a_bad_index_before_reading_any_header(tmp_path, monkeypatch):
    ckpt = good(tmp_path / "ckpt")
    write_index(ckpt, None, json.dumps({"metadata": [], "weight_map": WM}))
    import ckptflow.storage.checkpoint

    monkeypatch.setattr(ckptflow.storage.checkpoint, "read_header", lambda *a: pytest.fail("read a header"))
    with pytest.raises(UserError, match='"metadata" must be an object'):
        scan_checkpoint(open_location(str(ckpt)))


# ---------------------------------------------------------------- the 100 MB header, measured


def hostile_file(path: Path, n_tensors: int = 1_750_000, header_bytes: int = fmt.MAX_HEADER_BYTES) -> None:
    """A valid safetensors file: `n_tensors` zero-size tensors in a header padded to `header_bytes`."""
    body = b"{" + b",".join(b'"%x":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i
                            for i in range(n_tensors)) + b"}"
    assert len(body) <= header_bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", header_bytes) + body + b" " * (header_bytes - len(body)))


MEASURED_CLI = ROOT / "bench" / "measured_cli.py"  # writes its own VmHWM at exit


def run_measured(args: list[str]) -> tuple[int, str, float, int]:
    """(exit status, stderr, seconds, peak RSS in bytes) of `ckptflow ARGS` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        t0 = time.perf_counter()
        # validate never reaches Prefect: no server named for it (without xdist, naming the session's
        # would start it here, ~10 CPU-s)
        run = subprocess.run([PYTHON, str(MEASURED_CLI), *args], cwd=ROOT, capture_output=True, text=True,
                             env=cli_env(temporary_server=True, CKPTFLOW_HWM_FILE=str(hwm)), timeout=300)
        seconds = time.perf_counter() - t0
        return run.returncode, run.stderr, seconds, int(hwm.read_text()) * 1024


@pytest.mark.slow
def test_validate_on_100mb_headers_is_bounded(tmp_path):
    ckpt = tmp_path / "hostile"
    ckpt.mkdir()
    hostile_file(ckpt / "model.safetensors")
    assert safetensors_refuses((ckpt / "model.safetensors").read_bytes()) is False  # valid for safetensors
    rc, err, seconds, rss = run_measured(["validate", str(ckpt)])
    print(f"\nvalidate, one 100 MB header of 1.75M tensors: {seconds:.1f} s, peak RSS {rss / 2**20:.0f} MiB")
    assert rc == 1 and "Traceback" not in err
    assert "error: model.safetensors: header has up to 1750000 tensor entries" in err
    assert max(len(line) for line in err.splitlines()) <= 400
    assert rss <= 2**30
