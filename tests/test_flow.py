"""A whole conversion: output, reuse across runs, vanished outputs, refusals before any write; on the
engine's entry point (`run_convert`, what the flow runs), and the flow where Prefect is the subject."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ckptflow.flows.convert import convert_flow
from ckptflow.storage.errors import UserError

from .helpers import engine_convert, tree



def test_convert_then_rerun_hits_cache_and_recomputes_vanished(demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    first = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert first["shards"] == 6 and first["cached_shards"] == 0
    files = tree(out)
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors.index.json",
                          "tokenizer.json", "tokenizer_config.json",
                          *(f"model-0000{k}-of-00006.safetensors" for k in range(1, 7))}
    config = json.loads(files["config.json"])
    assert config["torch_dtype"] == "bfloat16" and "quantization_config" not in config
    index = json.loads(files["model.safetensors.index.json"])
    assert not any(k.endswith("_scale_inv") for k in index["weight_map"])
    assert index["metadata"]["total_size"] == first["bytes_written"]
    assert files["tokenizer.json"] == (demo_ckpt / "tokenizer.json").read_bytes()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}

    second = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert second["cached_shards"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == mtimes  # not rewritten

    (out / "model-00003-of-00006.safetensors").unlink()
    third = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert third["cached_shards"] == 5
    assert [r["name"] for r in third["records"] if not r["cached"]] == ["model-00003-of-00006.safetensors"]
    assert tree(out) == files


def test_changed_source_shard_is_recomputed(demo_ckpt, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    shard = demo_ckpt / "model-00001-of-00006.safetensors"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # a new version
    again = engine_convert(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert [r["name"] for r in again["records"] if not r["cached"]] == ["model-00001-of-00006.safetensors"]


def test_bad_input_fails_before_writing_anything(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    w = torch.zeros(4, 4).to(torch.float8_e4m3fn)
    save_file({"a.weight": w, "b.weight": torch.ones(2)}, src / "model-1.safetensors")
    save_file({"c.weight": w}, src / "model-2.safetensors")
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 40}, "weight_map": {
        "a.weight": "model-1.safetensors", "b.weight": "model-1.safetensors", "c.weight": "model-2.safetensors"}}))
    with pytest.raises(UserError) as err:
        engine_convert(str(src), str(tmp_path / "out"), work=str(tmp_path / "work"), dequant=True)
    assert "'a.weight' is F8_E4M3 but its scale 'a.weight_scale_inv' is not in the checkpoint" in str(err.value)
    assert "'c.weight'" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_validation_leaves_dest_untouched(demo_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors.index.json").write_text("{}")
    (demo_ckpt / "model-00004-of-00006.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(UserError):
        engine_convert(str(demo_ckpt), str(out), work=str(tmp_path / "work"), dequant=True)
    assert (out / "model.safetensors.index.json").read_text() == "{}"  # validation failed first: untouched


@pytest.mark.slow
def test_shard_committed_before_prefect_recorded_it_is_not_redone(prefect_harness, demo_ckpt, tmp_path):
    """A kill between a shard's commit and Prefect's result record: the commit journal covers it."""
    import shutil

    out, work = tmp_path / "out", tmp_path / "work"
    convert_flow(str(demo_ckpt), str(out), work=str(work), dequant=True)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")}
    shutil.rmtree(work / "results")  # as if every run had died before Prefect persisted its records
    again = convert_flow(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert again["cached_shards"] == 6
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.safetensors")} == mtimes
    shutil.rmtree(work / "results")
    (out / "model-00002-of-00006.safetensors").unlink()  # a journal entry without its output is not enough
    third = convert_flow(str(demo_ckpt), str(out), work=str(work), dequant=True)
    assert [r["name"] for r in third["records"] if not r["cached"]] == ["model-00002-of-00006.safetensors"]


def test_weight_files_of_another_layout_in_dest_stop_the_run_unless_pruned(demo_ckpt, tmp_path):
    out = tmp_path / "out"
    engine_convert(str(demo_ckpt), str(out), work=str(tmp_path / "w1"), dequant=True)
    before = tree(out)
    with pytest.raises(UserError, match=r"holds 6 weight file\(s\) this conversion does not write "
                                        r"\(model-00001-of-00006.safetensors, .*Delete them, or choose an empty DEST"):
        engine_convert(str(demo_ckpt), str(out), work=str(tmp_path / "w2"), reindex=True, max_shard_size="400KB",
                     dequant=True)
    assert tree(out) == before  # stopped before writing or deleting anything

    summary = engine_convert(str(demo_ckpt), str(out), work=str(tmp_path / "w2"), reindex=True,
                           max_shard_size="400KB", prune=True, dequant=True)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(names) == summary["shards"] > 6 and not any("-of-00006" in n for n in names)
