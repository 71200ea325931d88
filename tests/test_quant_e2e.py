"""Tiny real models through `--dequant`, loaded by transformers: gpt-oss MXFP4 and Llama in
compressed-tensors formats give the logits transformers gets from the quantized source; unknown
or misfit checkpoints end in one `error:` line with nothing in DEST; `inspect` from headers."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch

from ckptflow.flows.cli import main

from .helpers import dequant_reference, engine_convert, run_main
from .quant_fixtures import make_gpt_oss_mxfp4, make_llama, write

IDS = torch.tensor([[5, 17, 99, 3, 64, 120, 7, 42, 0, 88, 31, 12]])


def load(path, **kwargs):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16, output_loading_info=True,
                                                       **kwargs)
    return model.eval(), info


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def assert_clean_load(info) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.slow
def test_gpt_oss_mxfp4_dequant_matches_transformers_dequantize(tmp_path):
    from transformers import Mxfp4Config

    src = make_gpt_oss_mxfp4(tmp_path / "src")
    out = tmp_path / "out"
    summary = engine_convert(str(src), str(out), work=str(tmp_path / "work"), dequant=True)
    assert summary["dtypes"] == {"BF16": 37}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16" and "torch_dtype" not in config
    got, info = load(out)
    assert_clean_load(info)
    ref, _ = load(src, quantization_config=Mxfp4Config(dequantize=True))
    assert torch.equal(logits(got), logits(ref))
    ref_state = ref.state_dict()
    assert all(torch.equal(t, ref_state[k]) for k, t in got.state_dict().items())
    again = engine_convert(str(src), str(out), work=str(tmp_path / "work"), dequant=True)  # resume: every shard reused
    assert again["cached_shards"] == again["shards"] == summary["shards"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["ct-fp8-block", "ct-nvfp4", "ct-mxfp4"])
def test_compressed_tensors_llama_dequant_matches_transformers(tmp_path, scheme):
    pytest.importorskip("compressed_tensors")
    src = make_llama(tmp_path / "src", scheme)
    out = tmp_path / "out"
    dequant_reference(src, out, tmp_path / "work")  # the engine: a format's bytes need no flow run
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    got, info = load(out)
    assert_clean_load(info)
    ref, _ = load(src)  # transformers' own compressed-tensors loading (decompressed)
    assert torch.equal(logits(got), logits(ref))


def refusal_cases(tmp_path):
    w = torch.zeros(300, 260, dtype=torch.uint8).view(torch.float8_e4m3fn)
    yield "gptq", write(tmp_path / "gptq", {"m.q_proj.qweight": torch.zeros(32, 256, dtype=torch.int32),
                                            "m.q_proj.scales": torch.zeros(2, 256, dtype=torch.float16)},
                        {"torch_dtype": "float16", "quantization_config": {"quant_method": "gptq", "bits": 4}}), \
        "quantization scheme 'gptq' is not one ckptflow can dequantize"
    fp8 = {"torch_dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    yield "scale dtype", write(tmp_path / "f16", {"x.weight": w, "x.weight_scale_inv": torch.ones(3, 3).half()}, fp8), \
        "'x.weight_scale_inv' is F16; fp8-block scales must be BF16 or F32 or F8_E8M0"
    yield "grid", write(tmp_path / "grid", {"x.weight": w, "x.weight_scale_inv": torch.ones(2, 2)}, fp8), \
        "x.weight: scale shape [2, 2] does not match weight [300, 260] with 128×128 blocks (expected [3, 3])"


@pytest.mark.slow
def test_refusals_are_one_error_naming_it_and_nothing_in_dest(prefect_harness, tmp_path, capsys):
    for label, src, expected in refusal_cases(tmp_path):
        dest = tmp_path / f"out-{label.replace(' ', '-')}"
        before = sorted(p.name for p in src.iterdir())
        rc = main(["convert", str(src), str(dest), "--dequant", "--work", str(tmp_path / f"w-{label}")])
        err = capsys.readouterr().err
        assert rc == 2, (label, err)
        assert err.startswith("error: ") and err.count("error: ") == 1 and expected in err, (label, err)
        assert "Traceback" not in err
        assert not dest.exists() or not any(dest.iterdir()), label
        assert sorted(p.name for p in src.iterdir()) == before  # SOURCE untouched


def test_inspect_reports_groups_bytes_drops_and_refusals(tmp_path, capsys):
    src = make_llama(tmp_path / "ct", "ct-fp8-channel", static_input=True)
    assert main(["inspect", str(src), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (group,) = report["groups"]
    assert (group["scheme"], group["geometry"], group["codes_dtype"], group["scale_dtypes"], group["tensors"]) == \
        ("ct-fp8", "per-channel", "F8_E4M3", "BF16", 14)
    # 2 layers of q, k, v, o, gate, up, down: 61440 FP8 codes and 896 BF16 channel scales
    assert (group["bytes_in"], group["bytes_out"]) == (61440 + 896 * 2, 61440 * 2)
    assert len(report["dropped"]) == 14 and all(n.endswith(".input_scale") for n in report["dropped"])
    assert report["refused"] == [] and report["dequant_bytes_out"] > report["copied"]["bytes"]

    gptq = next(refusal_cases(tmp_path))[1]
    assert main(["inspect", str(gptq)]) == 1
    text = capsys.readouterr().out
    assert "refused:" in text and "'gptq' is not one ckptflow can dequantize" in text


def test_hostile_config_patterns_answer_at_once_through_the_cli(tmp_path):
    """`re:(.|\\w)+@` in `ignore` made `inspect` run for minutes (re backtracks on every module name);
    now it is matched in linear time, and a backreference is refused by name, with no traceback."""
    src = make_llama(tmp_path / "src", "ct-fp8-channel")
    config = json.loads((src / "config.json").read_text())

    def cli(pattern: str, *args: str) -> subprocess.CompletedProcess:
        config["quantization_config"]["ignore"] = ["lm_head", pattern]
        (src / "config.json").write_text(json.dumps(config))
        began = time.monotonic()
        run = run_main(*args)  # in this process: no torch + Prefect import to wait for
        assert time.monotonic() - began < 60  # before: minutes
        assert "Traceback" not in run.stdout + run.stderr
        return run

    run = cli(r"re:(.|\w)+@", "inspect", str(src), "--json")
    assert run.returncode == 0, run.stderr
    (group,) = json.loads(run.stdout)["groups"]
    assert (group["scheme"], group["tensors"]) == ("ct-fp8", 14)  # the pattern matches no module
    why = (r"config.json quantization_config.ignore: pattern 're:(\\w+)\\.\\1+@' uses a backreference "
           "(at position 7 of the regex), which the linear-time matcher does not support")
    dest = tmp_path / "out"
    run = cli(r"re:(\w+)\.\1+@", "convert", str(src), str(dest), "--dequant", "--dry-run")
    assert run.returncode == 2 and run.stderr.startswith(f"error: {why}") and len(run.stderr.splitlines()) == 1
    assert not dest.exists()


@pytest.mark.slow
def test_inspect_reads_headers_from_object_storage(tmp_path, capsys, s3_options):
    """Any fsspec URL: a gpt-oss checkpoint in S3 (moto on loopback), headers only."""
    import s3fs

    src = make_gpt_oss_mxfp4(tmp_path / "src")
    fs = s3fs.S3FileSystem(**s3_options["options"])
    url = f"s3://{s3_options['bucket']}/gpt-oss"
    fs.put(str(src) + "/", url + "/", recursive=True)
    assert main(["inspect", url, "--json", "--storage-options", json.dumps(s3_options["options"])]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"] == url and report["scheme"]["method"] == "mxfp4"
    (group,) = report["groups"]
    assert (group["scheme"], group["geometry"], group["tensors"]) == ("mxfp4", "groups of 32", 4)
