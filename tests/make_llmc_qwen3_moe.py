"""Make tests/data/llmc_qwen3_moe_nvfp4: a tiny Qwen3-MoE quantized to NVFP4A16 by llm-compressor's
`model_free_ptq`, the reference test_verify_quant.py checks `verify` against.

The test suite's environment does not install llm-compressor, so its output is kept in tests/data
(about 50 KB) with the versions that made it (VERSIONS.json). Regenerate it with the Python of a
separate venv that has llm-compressor (pip install llmcompressor==0.14.0.1 torch; /work/venvs/llmc here):

    $LLMC_PYTHON tests/make_llmc_qwen3_moe.py tests/data/llmc_qwen3_moe_nvfp4

Nothing from ckptflow is imported. The ignore list is the one llm-compressor's Qwen3-MoE examples
use (router gates stay BF16), plus the embedding, which `model_free_ptq` would otherwise quantize.
"""
from __future__ import annotations

import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

KEEP = ("config.json", "model.safetensors", "model.safetensors.index.json")


def main(out: str) -> int:
    import torch
    from llmcompressor import model_free_ptq
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(f"{tmp}/bf16")
        model_free_ptq(f"{tmp}/bf16", f"{tmp}/nvfp4", scheme="NVFP4A16",
                       ignore=["lm_head", "re:.*mlp.gate$", "model.embed_tokens"], max_workers=1, device="cpu")
        for name in KEEP:
            (dest / name).write_bytes(Path(tmp, "nvfp4", name).read_bytes())
    versions = {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
    (dest / "VERSIONS.json").write_text(json.dumps({"made_by": "tests/make_llmc_qwen3_moe.py",
                                                    "call": "model_free_ptq(scheme='NVFP4A16', ignore=['lm_head', "
                                                            "'re:.*mlp.gate$', 'model.embed_tokens'], device='cpu')",
                                                    **versions}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
