"""`--quantize … --rounding llmcompressor-cpu` on whole checkpoints equals llm-compressor's own
`model_free_ptq` on CPU, bit for bit (FP8_BLOCK, FP8_DYNAMIC, NVFP4A16; tiny Llama and Qwen3 saved
by transformers). llm-compressor 0.14 is in the test extra; its runs happen in one child process per
module (one import of llm-compressor for all seven), with this interpreter when it can import
llmcompressor, else CKPTFLOW_LLMC_PYTHON (a venv with llmcompressor==0.14.0.1). Without either the
tests skip, except under CI=true, where they fail.

Where llm-compressor itself fails (FP8_BLOCK on an intermediate size of 688, not a multiple of 128:
"non contiguous tensor"), the ragged weights are compared with the formula written below."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from .helpers import llmc_python
from .test_quantize_stage import quantize, tensors_of

pytestmark = [pytest.mark.slow,  # one child process runs llm-compressor on seven checkpoints
              pytest.mark.xdist_group("llmc")]  # so on one worker, with the fixture run once
SCHEMES = {"FP8_BLOCK": "fp8-block", "FP8_DYNAMIC": "fp8-channel", "NVFP4A16": "nvfp4"}
# what ckptflow never quantizes, told to llm-compressor (its default quantizes embed_tokens)
LLMC_IGNORE = ["lm_head", "re:.*embed_tokens$"]

# argv[1]: JSON list of [src, dst, preset]; prints one JSON object: dst -> null or the error's text
RUN_LLMC = """
import sys, json, traceback
from llmcompressor import model_free_ptq
result = {}
for src, dst, preset in json.loads(sys.argv[1]):
    try:
        model_free_ptq(model_stub=src, save_directory=dst, scheme=preset,
                       ignore=json.loads(sys.argv[2]), max_workers=1, device="cpu")
        result[dst] = None
    except Exception:
        result[dst] = traceback.format_exc()
print("RESULT " + json.dumps(result))
"""


def save(path: Path, family: str, intermediate: int) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    torch.manual_seed(3)
    kw = dict(vocab_size=256, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg = LlamaConfig(**kw) if family == "llama" else Qwen3Config(head_dim=64, **kw)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llmc(tmp_path_factory) -> dict[tuple[str, str, int], tuple[Path, Path, str | None]]:
    """(family, preset, intermediate) -> (source, llm-compressor's output, its error or None)."""
    root = tmp_path_factory.mktemp("llmc")
    cases = [(f, p, 512) for f in ("llama", "qwen3") for p in SCHEMES] + [("llama", "FP8_BLOCK", 688)]
    srcs = {(f, i): save(root / f"{f}-{i}", f, i) for f, _, i in cases}
    jobs = [(str(srcs[f, i]), str(root / f"ref-{f}-{p}-{i}"), p) for f, p, i in cases]
    run = subprocess.run([llmc_python(), "-c", RUN_LLMC, json.dumps(jobs), json.dumps(LLMC_IGNORE)],
                         capture_output=True, text=True, timeout=900)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert run.returncode == 0 and line, run.stderr[-3000:]
    errors = json.loads(line[len("RESULT "):])
    return {c: (Path(j[0]), Path(j[1]), errors[j[1]]) for c, j in zip(cases, jobs)}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("preset", list(SCHEMES))
def test_equals_model_free_ptq_bit_for_bit(tmp_path, llmc, family, preset):
    src, ref, error = llmc[family, preset, 512]
    assert error is None, error[-3000:]
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


def test_ragged_688_where_model_free_ptq_fails_matches_the_formula(tmp_path, llmc):
    src, _, error = llmc["llama", "FP8_BLOCK", 688]
    assert error is not None and "non contiguous tensor" in error  # llm-compressor's own failure
    out = tmp_path / "out"
    quantize(src, out, tmp_path / "work", quantize="fp8-block", rounding="llmcompressor-cpu")
    got, orig = tensors_of(out), tensors_of(src)
    for mod in ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj"):
        q, s = fp8_block_cpu(orig[mod + ".weight"])
        assert torch.equal(got[mod + ".weight_scale"].view(torch.int16), s.view(torch.int16)), mod
        assert torch.equal(got[mod + ".weight"].view(torch.uint8), q.view(torch.uint8)), mod
