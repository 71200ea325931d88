"""Small checkpoints with real layouts, generated on the spot (no download at run time).

`make_deepseek_v3_fp8` writes a DeepSeek-V3-shaped FP8 checkpoint: MLA attention, dense and
MoE layers with routed + shared experts, the MTP layer at index `num_hidden_layers`, block
scales with ragged edges, and some scales stored in a different shard than their weight. The
demo converts it; tests and benchmarks use it at other sizes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ckptflow.storage.files import CONFIG_NAME, INDEX_NAME, index_document, write_bytes_atomic, write_json
from ckptflow.storage.safetensors_format import TensorSpec
from ckptflow.storage.urls import Location
from ckptflow.storage.writer import SafetensorsWriter
from ckptflow.tasks.kernels.dtype_map import TORCH_TO_ST

BLOCK = 128


@dataclass(frozen=True)
class DeepSeekDims:
    vocab_size: int = 1000
    hidden_size: int = 200            # not a multiple of 128: ragged block edges everywhere
    intermediate_size: int = 300
    moe_intermediate_size: int = 72
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    q_lora_rank: int = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    num_nextn_predict_layers: int = 1
    layers_per_shard: int = 1


def deepseek_config(d: DeepSeekDims) -> dict:
    fields = {k: v for k, v in asdict(d).items() if k != "layers_per_shard"}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        **fields, "num_key_value_heads": d.num_attention_heads, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]},
    }


Maker = Callable[[], torch.Tensor]
Entry = tuple[str, torch.dtype, tuple[int, ...], Maker]


def _layer_entries(d: DeepSeekDims, i: int, g: torch.Generator) -> list[Entry]:
    h = d.hidden_size
    p = f"model.layers.{i}."
    out: list[Entry] = []

    def bf16(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> None:
        out.append((name, dtype, shape, lambda: (torch.randn(shape, generator=g) * 0.02).to(dtype)))

    def fp8(name: str, shape: tuple[int, ...]) -> None:
        # values spread over e4m3's range (±448) like real quantized weights; no NaN codes
        out.append((name, torch.float8_e4m3fn, shape,
                    lambda: (torch.randn(shape, generator=g) * 120).clamp(-448, 448).to(torch.float8_e4m3fn)))
        sshape = (*shape[:-2], math.ceil(shape[-2] / BLOCK), math.ceil(shape[-1] / BLOCK))
        out.append((name + "_scale_inv", torch.float32, sshape,
                    lambda: torch.rand(sshape, generator=g) * 1e-3 + 1e-5))

    heads, qk = d.num_attention_heads, d.qk_nope_head_dim + d.qk_rope_head_dim
    bf16(p + "input_layernorm.weight", (h,))
    fp8(p + "self_attn.q_a_proj.weight", (d.q_lora_rank, h))
    bf16(p + "self_attn.q_a_layernorm.weight", (d.q_lora_rank,))
    fp8(p + "self_attn.q_b_proj.weight", (heads * qk, d.q_lora_rank))
    fp8(p + "self_attn.kv_a_proj_with_mqa.weight", (d.kv_lora_rank + d.qk_rope_head_dim, h))
    bf16(p + "self_attn.kv_a_layernorm.weight", (d.kv_lora_rank,))
    fp8(p + "self_attn.kv_b_proj.weight", (heads * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank))
    fp8(p + "self_attn.o_proj.weight", (h, heads * d.v_head_dim))
    bf16(p + "post_attention_layernorm.weight", (h,))
    if i < d.first_k_dense_replace:
        for proj, shape in (("gate_proj", (d.intermediate_size, h)), ("up_proj", (d.intermediate_size, h)),
                            ("down_proj", (h, d.intermediate_size))):
            fp8(p + f"mlp.{proj}.weight", shape)
        return out
    bf16(p + "mlp.gate.weight", (d.n_routed_experts, h))
    bf16(p + "mlp.gate.e_score_correction_bias", (d.n_routed_experts,), torch.float32)
    m = d.moe_intermediate_size
    for e in [*(f"experts.{k}" for k in range(d.n_routed_experts)), "shared_experts"]:
        width = m * (d.n_shared_experts if e == "shared_experts" else 1)
        fp8(p + f"mlp.{e}.gate_proj.weight", (width, h))
        fp8(p + f"mlp.{e}.up_proj.weight", (width, h))
        fp8(p + f"mlp.{e}.down_proj.weight", (h, width))
    return out


def deepseek_entries(d: DeepSeekDims, seed: int = 0) -> list[list[Entry]]:
    """Tensors grouped by shard: embeddings, one group per `layers_per_shard` layers, MTP, head."""
    g = torch.Generator().manual_seed(seed)
    h, v = d.hidden_size, d.vocab_size
    groups: list[list[Entry]] = [[("model.embed_tokens.weight", torch.bfloat16, (v, h),
                                   lambda: (torch.randn((v, h), generator=g) * 0.02).to(torch.bfloat16))]]
    for start in range(0, d.num_hidden_layers, d.layers_per_shard):
        group: list[Entry] = []
        for i in range(start, min(start + d.layers_per_shard, d.num_hidden_layers)):
            group += _layer_entries(d, i, g)
        groups.append(group)
    for k in range(d.num_nextn_predict_layers):  # MTP: layer index num_hidden_layers + k
        i = d.num_hidden_layers + k
        p = f"model.layers.{i}."
        mtp = _layer_entries(d, i, g)
        for name, shape in ((p + "enorm.weight", (h,)), (p + "hnorm.weight", (h,)),
                            (p + "eh_proj.weight", (h, 2 * h)), (p + "shared_head.norm.weight", (h,)),
                            (p + "shared_head.head.weight", (v, h)), (p + "embed_tokens.weight", (v, h))):
            mtp.append((name, torch.bfloat16, shape,
                        lambda shape=shape: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)))
        groups.append(mtp)
    groups.append([("model.norm.weight", torch.bfloat16, (h,), lambda: torch.ones(h, dtype=torch.bfloat16)),
                   ("lm_head.weight", torch.bfloat16, (v, h),
                    lambda: (torch.randn((v, h), generator=g) * 0.02).to(torch.bfloat16))])
    # Real checkpoints often store a weight's scale in the next shard: move every other layer
    # shard's attention scales one shard forward.
    for gi in range(1, len(groups) - 1, 2):
        moved = [e for e in groups[gi] if e[0].endswith("_scale_inv") and ".self_attn." in e[0]]
        groups[gi] = [e for e in groups[gi] if e not in moved]
        groups[gi + 1] = moved + groups[gi + 1]
    return groups


def write_checkpoint(loc: Location, groups: list[list[Entry]], config: dict,
                     extra_files: dict[str, bytes] | None = None) -> dict[str, str]:
    """Write shards `model-0000k-of-0000N.safetensors`, index, config and extra files."""
    n = len(groups)
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        specs = [TensorSpec(t, TORCH_TO_ST[dtype], shape) for t, dtype, shape, _ in group]
        with SafetensorsWriter(loc, name, specs) as w:
            for (t, dtype, shape, make), spec in zip(group, specs):
                tensor = make().contiguous()
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise RuntimeError(f"generator bug: {t} is {tensor.dtype}{list(tensor.shape)}")
                w.write(t, memoryview(tensor.view(torch.uint8).numpy()).cast("B") if tensor.numel() else b"")
                weight_map[t] = name
                total += spec.nbytes
            w.commit()
    write_json(loc, INDEX_NAME, index_document(weight_map, total))
    write_json(loc, CONFIG_NAME, config)
    for fname, data in (extra_files or {}).items():
        write_bytes_atomic(loc, fname, data)
    return weight_map


TOKENIZER_FILES = {
    "tokenizer_config.json": b'{"model_max_length": 4096, "tokenizer_class": "LlamaTokenizerFast"}\n',
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n',
    "generation_config.json": b'{"bos_token_id": 0, "eos_token_id": 1}\n',
}


def make_deepseek_v3_fp8(loc: Location, dims: DeepSeekDims = DeepSeekDims(), seed: int = 0) -> dict[str, str]:
    return write_checkpoint(loc, deepseek_entries(dims, seed), deepseek_config(dims), TOKENIZER_FILES)
