"""`--quantize … --rounding llmcompressor-cpu` on whole checkpoints equals llm-compressor's own
`model_free_ptq` on CPU, bit for bit (FP8_BLOCK, FP8_DYNAMIC, NVFP4A16; tiny Llama and Qwen3 saved
by transformers). llm-compressor 0.14 pins compressed-tensors 0.19, which the test extra's 0.20
excludes, so it runs from its own virtualenv (CKPTFLOW_LLMC_PYTHON, default /work/venvs/llmc);
without it these tests skip.

Where llm-compressor itself fails (FP8_BLOCK on an intermediate size of 688, not a multiple of 128:
"non contiguous tensor"), the ragged weights are compared with the formula written below."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from .test_quantize_stage import quantize, tensors_of

LLMC = Path(os.environ.get("CKPTFLOW_LLMC_PYTHON", "/work/venvs/llmc/bin/python"))
pytestmark = [pytest.mark.slow,  # each runs llm-compressor in a subprocess (~30 s)
              pytest.mark.skipif(not LLMC.exists(), reason=f"llm-compressor's virtualenv not at {LLMC}")]
SCHEMES = {"FP8_BLOCK": "fp8-block", "FP8_DYNAMIC": "fp8-channel", "NVFP4A16": "nvfp4"}
# what ckptflow never quantizes, told to llm-compressor (its default quantizes embed_tokens)
LLMC_IGNORE = ["lm_head", "re:.*embed_tokens$"]

RUN_LLMC = """
import sys, json
from llmcompressor import model_free_ptq
model_free_ptq(model_stub=sys.argv[1], save_directory=sys.argv[2], scheme=sys.argv[3],
               ignore=json.loads(sys.argv[4]), max_workers=1, device="cpu")
"""


def save(path: Path, family: str, intermediate: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(3)
    kw = dict(vocab_size=256, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen3Config(head_dim=64, **kw)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def llmc(src: Path, out: Path, preset: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(LLMC), "-c", RUN_LLMC, str(src), str(out), preset, json.dumps(LLMC_IGNORE)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("preset", list(SCHEMES))
def test_equals_model_free_ptq_bit_for_bit(tmp_path, family, preset):
    src = save(tmp_path / "src", family, 512)
    ref = tmp_path / "ref"
    run = llmc(src, ref, preset)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize=SCHEMES[preset], rounding="llmcompressor-cpu")
    want, got = tensors_of(ref), tensors_of(out)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name].view(torch.uint8), want[name].view(torch.uint8)), name
    ours = json.loads((out / "config.json").read_text())["quantization_config"]
    theirs = json.loads((ref / "config.json").read_text())["quantization_config"]
    assert theirs.pop("ignore") == LLMC_IGNORE and ours.pop("ignore") == ["lm_head"]  # the one difference
    assert ours == theirs


def fp8_block_cpu(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' FP8_BLOCK on the CPU, written out: block amax / 448 in BF16 (stored so);
    codes = (w / scale) divided in BF16 (llm-compressor's CPU path), clamped, cast to e4m3."""
    rows, cols = w.shape
    rb, cb = -(-rows // 128), -(-cols // 128)
    pad = torch.zeros(rb * 128, cb * 128, dtype=w.dtype)
    pad[:rows, :cols] = w
    scale = (pad.abs().reshape(rb, 128, cb, 128).amax(dim=(1, 3)) / 448.0).to(torch.bfloat16)
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    return (w / full).clamp(-448, 448).to(torch.float8_e4m3fn), scale


def test_ragged_688_where_model_free_ptq_fails_matches_the_formula(tmp_path):
    src = save(tmp_path / "src", "llama", 688)
    run = llmc(src, tmp_path / "ref", "FP8_BLOCK")
    assert run.returncode != 0 and "non contiguous tensor" in run.stderr  # llm-compressor's own failure
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize="fp8-block", rounding="llmcompressor-cpu")
    got, orig = tensors_of(out), tensors_of(src)
    for mod in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        q, s = fp8_block_cpu(orig[mod + ".weight"])
        assert torch.equal(got[mod + ".weight_scale"].view(torch.int16), s.view(torch.int16)), mod
        assert torch.equal(got[mod + ".weight"].view(torch.uint8), q.view(torch.uint8)), mod
