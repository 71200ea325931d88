"""llm-compressor's own quantization of a few weights: the reference tests/test_quant_make.py compares with.

It runs llm-compressor 0.14's `ModelFreePtqConverter.process` (what `model_free_ptq` runs on each
shard: observers, shared global scales for fused q/k/v and gate/up, `compress_module`) on tensors
in memory, on the CPU. Nothing from ckptflow is imported, so this file also runs as a script
under the Python of a separate reference venv (CKPTFLOW_LLMC_PYTHON):

    python llmc_reference.py IN.safetensors OUT.safetensors SCHEME

IN's tensors are named like a model's (`model.layers.0.self_attn.q_proj.weight`); OUT holds what
the converter returns (`…weight` FP8 + `…weight_scale`, or `…weight_packed`, `…weight_scale`,
`…weight_global_scale`), each made contiguous (FP8_BLOCK returns ragged weights as views, which
`safetensors.save_file` refuses: the "non contiguous tensor" failure of `model_free_ptq`).
"""
from __future__ import annotations

import sys

import torch


def quantize(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
    from llmcompressor.entrypoints.model_free.converter import ModelFreePtqConverter

    config = QuantizationConfig(config_groups={scheme: preset_name_to_scheme(scheme, ["Linear"])}, ignore=[])
    out = ModelFreePtqConverter(config).process(dict(tensors))
    return {name: t.contiguous() for name, t in out.items()}


def main(argv: list[str]) -> int:
    from safetensors.torch import load_file, save_file

    src, dst, scheme = argv
    save_file(quantize(load_file(src), scheme), dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
