"""llm-compressor's own quantization of a few weights: the reference tests/test_quant_make.py compares with.

It runs llm-compressor 0.14's `ModelFreePtqConverter.process` (what `model_free_ptq` runs on each
shard: observers, shared global scales for fused q/k/v and gate/up, `compress_module`) on tensors
in memory, on the CPU. Nothing from ckptflow is imported, so this file also runs as a script
under the Python of a separate reference venv (CKPTFLOW_LLMC_PYTHON):

    python llmc_reference.py IN.safetensors OUT.safetensors

IN's keys are `SCHEME::tensor name`, so one run (one import of llm-compressor, seconds) serves a
whole test module; OUT's keys carry the same prefix. SCHEME is a compressed-tensors preset
(FP8_BLOCK, FP8_DYNAMIC, NVFP4A16, MXFP4A16), or one of two single functions applied to every
tensor of IN: "generate_gparam" (the NVFP4 global scale of each element taken as an amax) and
"cast_to_fp4" (E2M1 rounding then `pack_fp4_to_uint8`).

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


def single_function(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
    from compressed_tensors.quantization.utils.helpers import generate_gparam

    out = {}
    for key, t in tensors.items():
        if name == "generate_gparam":  # one amax per element, as the observer passes a fused group's
            out[key] = torch.cat([generate_gparam(-a.reshape(1), a.reshape(1)) for a in t.reshape(-1)])
        else:
            out[key] = pack_fp4_to_uint8(FP4_E2M1_DATA.cast_to_fp4(torch.clamp(t.clone(), -6.0, 6.0)))
    return out


def reference(tensors: dict[str, torch.Tensor], scheme: str) -> dict[str, torch.Tensor]:
    if scheme in ("generate_gparam", "cast_to_fp4"):
        return single_function(tensors, scheme)
    return quantize(tensors, scheme)


def reference_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`SCHEME::name` keys in, the same prefixes out: each scheme's tensors processed together."""
    jobs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        scheme, name = key.split("::", 1)
        jobs.setdefault(scheme, {})[name] = t
    return {f"{scheme}::{name}": t for scheme, job in jobs.items() for name, t in reference(job, scheme).items()}


def main(argv: list[str]) -> int:
    from safetensors.torch import load_file, save_file

    src, dst = argv
    save_file(reference_all(load_file(src)), dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
