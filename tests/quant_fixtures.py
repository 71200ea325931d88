"""Checkpoint generators for each quantized format, written from the formats' public descriptions.

- FP8 block (DeepSeek-V3 / Qwen3 FP8 / V3.1 ue8m0): `W` F8_E4M3 + `W_scale_inv` [ceil(r/bm), ceil(c/bn)]
  in F32, BF16 or F8_E8M0, `quantization_config = {quant_method: fp8, weight_block_size}`.
- compressed-tensors float-quantized FP8 (llm-compressor): `weight` F8_E4M3 + `weight_scale`
  ([1] tensor, [out, 1] channel, [ceil(r/bm), ceil(c/bn)] block), `input_scale` for static
  activations; nvfp4-pack-quantized: `weight_packed` U8 [out, in/2] (low nibble first),
  `weight_scale` F8_E4M3 [out, in/16], `weight_global_scale` F32 [1].
- compressed-tensors mxfp4-pack-quantized: made by compressed-tensors itself (`ct_mxfp4_compress`,
  `ct_mxfp4_config`): `weight_packed` U8 [out, in/2], `weight_scale` U8 E8M0 [out, in/32].
- gpt-oss MXFP4: `*_blocks` U8 [E, OUT, IN/32, 16], `*_scales` U8 E8M0 [E, OUT, IN/32].
- ModelOpt: `hf_quant_config.json` {producer, quantization: {quant_algo, group_size, …}}; NVFP4
  `weight` U8 + `weight_scale` F8_E4M3 + `weight_scale_2` F32 []; FP8 `weight` + F32 [] scale.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

E4M3_MAX = 448.0


def random_codes(shape: tuple[int, ...], g: torch.Generator, special: bool = True) -> torch.Tensor:
    """Random bytes; with `special`, also zero, ±0, subnormal, ±max and NaN e4m3 codes up front."""
    codes = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
    if special and codes.numel() >= 8:
        flat = codes.view(-1)
        flat[:8] = torch.tensor([0x00, 0x80, 0x01, 0x81, 0x7E, 0xFE, 0x7F, 0xFF], dtype=torch.uint8)
    return codes


def quantize_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def write(path: Path, tensors: dict[str, torch.Tensor], config: dict, files: int = 1,
          extra: dict[str, dict] | None = None) -> Path:
    """Save `tensors` into `files` shards (round robin, so scales land away from their weights)."""
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if files == 1:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(files):
            part = {n: tensors[n] for n in names[i::files]}
            fname = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            save_file(part, path / fname, metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(config))
    for name, doc in (extra or {}).items():
        (path / name).write_text(json.dumps(doc))
    return path


# ---------------------------------------------------------------- tiny models quantized

def ct_fp8_config(strategy: str, block: tuple[int, int] | None = None, static_input: bool = False) -> dict:
    weights = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True, "dynamic": False,
               "group_size": None, "block_structure": list(block) if block else None, "observer": "minmax"}
    acts = ({"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True, "dynamic": False,
             "observer": "minmax"} if static_input else None)
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                          "output_activations": None, "format": "float-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def ct_nvfp4_config() -> dict:
    weights = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16, "symmetric": True,
               "dynamic": False, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "format": "nvfp4-pack-quantized"}},
            "ignore": ["lm_head"], "kv_cache_scheme": None}


def ct_mxfp4_scheme():
    """compressed-tensors' own MXFP4A16 preset (group 32, uint8 E8M0 scales) targeting Linear."""
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme("MXFP4A16", ["Linear"])


def ct_mxfp4_compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """`w` (BF16 [out, in], in a multiple of 32) compressed by compressed-tensors as llm-compressor
    does: its observer's qparams (calculate_qparams on each group's min/max: power-of-two scales),
    then MXFP4PackedCompressor.compress → weight_packed, weight_scale."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    scheme = ct_mxfp4_scheme()
    groups = w.reshape(w.shape[0], -1, 32)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights)
    out = MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zero}, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def ct_mxfp4_config() -> dict:
    """The quantization_config compressed-tensors writes for it (ModelCompressor.update_config)."""
    import tempfile

    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": ct_mxfp4_scheme()}, format="mxfp4-pack-quantized",
                            quantization_status="compressed", ignore=["lm_head"])
    with tempfile.TemporaryDirectory() as tmp:
        ModelCompressor(quantization_config=qc).update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]


def is_linear(name: str) -> bool:
    return name.endswith("proj.weight") and ".layers." in name


def quantize_state_dict(sd: dict[str, torch.Tensor], scheme: str, g: torch.Generator,
                        block: tuple[int, int] = (16, 16), static_input: bool = False,
                        scale_dtype: torch.dtype = torch.bfloat16,
                        linear=is_linear) -> dict[str, torch.Tensor]:
    """A BF16 state dict with every decoder Linear quantized as `scheme` describes; with
    `static_input`, also the activation scales llm-compressor writes for static FP8 inputs.
    FP8 scales are in the model's dtype, as llm-compressor writes them (transformers casts a
    float32 `weight_scale` to the model dtype when it loads, compressed-tensors does not).
    `linear(name)` says which tensors are Linear weights to quantize."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if not linear(name):
            out[name] = t.contiguous()
            continue
        base = name[: -len(".weight")]
        rows, cols = t.shape
        if scheme in ("ct-fp8-channel", "ct-fp8-tensor", "ct-fp8-block", "modelopt-fp8"):
            if scheme == "ct-fp8-channel":
                s = (t.float().abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=1e-8).to(scale_dtype)
                full = s
            elif scheme in ("ct-fp8-tensor", "modelopt-fp8"):  # ModelOpt: one F32 scale, shape []
                s = (t.float().abs().amax() / E4M3_MAX).reshape(1).to(scale_dtype)
                s = s.reshape(()).float() if scheme == "modelopt-fp8" else s
                full = s
            else:
                bm, bn = block
                s = (torch.rand(-(-rows // bm), -(-cols // bn), generator=g) * 1e-3 + 1e-4).to(scale_dtype)
                full = s.repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:rows, :cols]
            out[name] = quantize_fp8(t, full)
            out[base + ".weight_scale"] = s
            if static_input:
                out[base + ".input_scale"] = torch.tensor([0.02], dtype=torch.float32)
        elif scheme in ("ct-nvfp4", "modelopt-nvfp4"):
            out[base + (".weight_packed" if scheme == "ct-nvfp4" else ".weight")] = random_codes(
                (rows, cols // 2), g, special=False)
            # e4m3 scale codes 0x20..0x3F: 2^-3 .. ~0.9, no NaN; the global scale brings values near 1e-2
            out[base + ".weight_scale"] = torch.randint(0x20, 0x40, (rows, -(-cols // 16)), dtype=torch.uint8,
                                                        generator=g).view(torch.float8_e4m3fn)
            if scheme == "ct-nvfp4":
                out[base + ".weight_global_scale"] = torch.tensor([40.0], dtype=torch.float32)
            else:
                out[base + ".weight_scale_2"] = torch.tensor(0.025, dtype=torch.float32)
                if static_input:
                    out[base + ".input_scale"] = torch.tensor(0.01, dtype=torch.float32)
        elif scheme == "ct-mxfp4":
            out.update({f"{base}.{k}": v for k, v in ct_mxfp4_compress(t).items()})
        else:
            raise ValueError(scheme)
    return out


def tiny_llama(seed: int = 0):
    """A random tiny Llama in BF16 (hidden 64: whole 16- and 32-element groups)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def make_llama(path: Path, scheme: str, seed: int = 0, static_input: bool = False) -> Path:
    """A tiny Llama quantized as `scheme`: ct-fp8-{tensor,channel,block}, ct-nvfp4, ct-mxfp4,
    modelopt-{fp8,nvfp4}."""
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed)
    sd = quantize_state_dict(model.state_dict(), scheme, g, static_input=static_input)
    config = model.config.to_dict()
    extra = None
    if scheme.startswith("ct-fp8"):
        strategy = scheme.rsplit("-", 1)[1]
        config["quantization_config"] = ct_fp8_config(strategy, (16, 16) if strategy == "block" else None,
                                                      static_input)
    elif scheme == "ct-nvfp4":
        config["quantization_config"] = ct_nvfp4_config()
    elif scheme == "ct-mxfp4":
        config["quantization_config"] = ct_mxfp4_config()
    elif scheme.startswith("modelopt"):
        algo = {"quant_algo": "NVFP4", "group_size": 16} if scheme == "modelopt-nvfp4" else {"quant_algo": "FP8"}
        extra = {"hf_quant_config.json": {"producer": {"name": "modelopt", "version": "0.29.0"},
                                          "quantization": {**algo, "kv_cache_quant_algo": None,
                                                           "exclude_modules": ["lm_head"]}}}
    return write(path, sd, config, files=2, extra=extra)


def tiny_gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64,
                       layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False)
    return GptOssForCausalLM(cfg).to(torch.bfloat16)


def make_gpt_oss_mxfp4(path: Path, seed: int = 0) -> Path:
    """gpt-oss as OpenAI ships it: experts' gate_up_proj/down_proj as MXFP4 blocks + E8M0 scales."""
    model = tiny_gpt_oss(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inp, out = t.shape  # transformers' layout [E, IN, OUT]; packed is [E, OUT, IN/32, 16]
            sd[name + "_blocks"] = random_codes((experts, out, inp // 32, 16), g, special=False)
            scales = torch.randint(120, 126, (experts, out, inp // 32), dtype=torch.uint8, generator=g)
            sd[name + "_scales"] = scales
        else:
            sd[name] = t.contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return write(path, sd, config, files=2)


def moe_state_dict(seed: int = 0, experts: int = 3) -> dict[str, torch.Tensor]:
    """A tiny BF16 MoE decoder layer with every fused group the reindex table knows: q/k/v, MLA
    q_a_proj + kv_a_proj_with_mqa (DeepSeek), gate/up of routed and shared experts (Qwen3-MoE's
    `shared_expert`, DeepSeek's `shared_experts`), plus the router gate, norms and embeddings."""
    g = torch.Generator().manual_seed(seed)
    bf = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16)  # noqa: E731
    h, inter = 64, 32
    sd = {"model.embed_tokens.weight": bf(128, h), "model.norm.weight": bf(h), "lm_head.weight": bf(128, h)}
    p = "model.layers.0."
    sd |= {p + "input_layernorm.weight": bf(h), p + "self_attn.q_proj.weight": bf(h, h),
           p + "self_attn.k_proj.weight": bf(32, h), p + "self_attn.v_proj.weight": bf(32, h),
           p + "self_attn.o_proj.weight": bf(h, h), p + "self_attn.q_a_proj.weight": bf(32, h),
           p + "self_attn.kv_a_proj_with_mqa.weight": bf(48, h), p + "mlp.gate.weight": bf(experts, h)}
    for mod in [f"mlp.experts.{e}." for e in range(experts)] + ["mlp.shared_expert.", "mlp.shared_experts."]:
        sd |= {p + mod + "gate_proj.weight": bf(inter, h), p + mod + "up_proj.weight": bf(inter, h),
               p + mod + "down_proj.weight": bf(h, inter)}
    return sd


def is_moe_linear(name: str) -> bool:
    """The Linear weights of `moe_state_dict` that a quantizer takes (not the router, norms, embeddings)."""
    return ".layers." in name and name.endswith(("proj.weight", "proj_with_mqa.weight"))


def make_moe(path: Path, scheme: str, seed: int = 0, files: int = 2,
             scales: dict[str, float] | None = None) -> Path:
    """`moe_state_dict` quantized as `scheme` (ct-nvfp4, modelopt-nvfp4, ct-fp8-{tensor,block}) and
    saved with its config; `scales` overrides the global (NVFP4) or per-tensor (FP8) scale of
    modules, e.g. {"model.layers.0.mlp.experts.1.up_proj": 41.0}."""
    g = torch.Generator().manual_seed(seed)
    sd = quantize_state_dict(moe_state_dict(seed), scheme, g, linear=is_moe_linear)
    suffix = {"ct-nvfp4": ".weight_global_scale", "modelopt-nvfp4": ".weight_scale_2"}.get(scheme, ".weight_scale")
    for module, value in (scales or {}).items():
        old = sd[module + suffix]
        sd[module + suffix] = torch.full_like(old, value)
    config = {"model_type": "qwen3_moe", "torch_dtype": "bfloat16", "num_hidden_layers": 1}
    extra = None
    if scheme == "ct-nvfp4":
        config["quantization_config"] = ct_nvfp4_config()
    elif scheme.startswith("ct-fp8"):
        strategy = scheme.rsplit("-", 1)[1]
        config["quantization_config"] = ct_fp8_config(strategy, (16, 16) if strategy == "block" else None)
    else:
        extra = {"hf_quant_config.json": {"producer": {"name": "modelopt", "version": "0.29.0"},
                                          "quantization": {"quant_algo": "NVFP4", "group_size": 16,
                                                           "exclude_modules": ["lm_head"]}}}
    return write(path, sd, config, files=files, extra=extra)
