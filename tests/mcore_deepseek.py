"""DeepSeek-V3 671B as Megatron-Core saves it in torch_dist: exact `.metadata`, sparse `.distcp` files.

No megatron-core needed. Keys, shapes and chunking follow Megatron-Core's sharded_state_dict for
the TransformerEngine spec (checked against NVIDIA/Megatron-LM main, Aug 2026):
- `moe_layer_freq` is a list (3 dense layers, then MoE), so the block is non-homogeneous: every
  layer has keys of its own, `decoder.layers.{l}.…`, without a stacked layer axis;
- MLA (`multi_latent_attention.py`): linear_q_down_proj and linear_kv_down_proj are TELinear
  `duplicated` (one chunk, not TP-split), linear_q_up_proj / linear_kv_up_proj are
  TELayerNormColumnParallelLinear (q_layernorm / kv_layernorm fused: `.layer_norm_weight`),
  linear_proj is row-parallel; input_layernorm is a TENorm of its own;
- SwiGLU fc1 is saved as 2 chunks per TP rank ([gate rows r; up rows r]); routed experts one
  chunk per expert (expert TP = 1, 32 per EP rank) of `mlp.experts.experts.linear_fc{1,2}.weight`
  [E, …]; the router's `expert_bias` is fp32;
- MTP (mtp_num_layers=1): `mtp.layers.0.{enorm,hnorm,eh_proj,final_layernorm}` and the layer under
  `mtp.layers.0.transformer_layer.` (key names from multi_token_prediction.py; not checked against
  a real save);
- `.metadata`: torch's own Metadata (state_dict_metadata, storage_data, storage_meta, version),
  `_extra_state` and `rng_state` as bytes entries. Megatron's cached `all_local_plans` are left
  out (they would double the file; the reader never uses them).
Vocabulary 129280, padded to a multiple of 128 × TP = 1024: 130048 rows.
"""
from __future__ import annotations

import math
import pickle
from argparse import Namespace
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   StorageMeta, TensorProperties, TensorStorageMetadata)

from tests.mcore_sparse import SparseFile

H, LAYERS, DENSE, E, F, MF, SF = 7168, 61, 3, 256, 18432, 2048, 2048
HEADS, QL, KVL, QK, ROPE, VD = 128, 1536, 512, 128, 64, 128
VOCAB, PADDED = 129280, 130048
TP, PP, EP = 8, 4, 8
PP_LAYERS = (16, 15, 15, 15)  # 61 layers over 4 stages, the first one heavier (as the DSv3 recipes do)
BF16, F32 = torch.bfloat16, torch.float32
# MLA and MoE layer keys → (shape, dtype, how TP cuts it: None, ("dim", d) or "swiglu")
ATTN = {
    "input_layernorm.weight": ((H,), BF16, None),
    "self_attention.linear_q_down_proj.weight": ((QL, H), BF16, None),
    "self_attention.linear_q_up_proj.layer_norm_weight": ((QL,), BF16, None),
    "self_attention.linear_q_up_proj.weight": ((HEADS * (QK + ROPE), QL), BF16, ("dim", 0)),
    "self_attention.linear_kv_down_proj.weight": ((KVL + ROPE, H), BF16, None),
    "self_attention.linear_kv_up_proj.layer_norm_weight": ((KVL,), BF16, None),
    "self_attention.linear_kv_up_proj.weight": ((HEADS * (QK + VD), KVL), BF16, ("dim", 0)),
    "self_attention.linear_proj.weight": ((H, HEADS * VD), BF16, ("dim", 1)),
}
DENSE_MLP = {
    "mlp.linear_fc1.layer_norm_weight": ((H,), BF16, None),
    "mlp.linear_fc1.weight": ((2 * F, H), BF16, "swiglu"),
    "mlp.linear_fc2.weight": ((H, F), BF16, ("dim", 1)),
}
MOE = {
    "pre_mlp_layernorm.weight": ((H,), BF16, None),
    "mlp.router.weight": ((E, H), BF16, None),
    "mlp.router.expert_bias": ((E,), F32, None),
    "mlp.experts.experts.linear_fc1.weight": ((E, 2 * MF, H), BF16, "experts"),
    "mlp.experts.experts.linear_fc2.weight": ((E, H, MF), BF16, "experts"),
    "mlp.shared_experts.linear_fc1.weight": ((2 * SF, H), BF16, "swiglu"),
    "mlp.shared_experts.linear_fc2.weight": ((H, SF), BF16, ("dim", 1)),
}
TE_MODULES = ("self_attention.linear_q_down_proj", "self_attention.linear_q_up_proj",
              "self_attention.linear_kv_down_proj", "self_attention.linear_kv_up_proj", "self_attention.linear_proj")


def args() -> Namespace:
    """Megatron-LM's args for DeepSeek-V3 (the names its arguments.py uses)."""
    return Namespace(
        num_layers=LAYERS, hidden_size=H, ffn_hidden_size=F, num_attention_heads=HEADS, kv_channels=QK,
        multi_latent_attention=True, q_lora_rank=QL, kv_lora_rank=KVL, qk_head_dim=QK, qk_pos_emb_head_dim=ROPE,
        v_head_dim=VD, num_experts=E, moe_ffn_hidden_size=MF, moe_shared_expert_intermediate_size=SF,
        moe_layer_freq=[0] * DENSE + [1] * (LAYERS - DENSE), moe_router_topk=8, moe_router_num_groups=8,
        moe_router_group_topk=4, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=2.5, moe_router_pre_softmax=False, mtp_num_layers=1,
        max_position_embeddings=163840, seq_length=4096, norm_epsilon=1e-6, normalization="RMSNorm", swiglu=True,
        add_bias_linear=False, untie_embeddings_and_output_weights=True, position_embedding_type="rope",
        rotary_base=10000, rotary_scaling_factor=40, original_max_position_embeddings=4096,
        beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0, vocab_size=VOCAB, padded_vocab_size=PADDED,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=TP, pipeline_model_parallel_size=PP,
        expert_model_parallel_size=EP, expert_tensor_parallel_size=1, transformer_impl="transformer_engine",
        params_dtype=torch.bfloat16, bf16=True, init_method_std=0.006)


def _boxes(shape: tuple[int, ...], how) -> list[tuple[tuple[int, ...], tuple[int, ...], int]]:
    """(offsets, sizes, TP or EP rank that writes it) of each chunk."""
    zero = (0,) * len(shape)
    if how is None:
        return [(zero, shape, 0)]
    if how == "experts":
        return [((e,) + zero[1:], (1,) + shape[1:], e // (E // EP)) for e in range(E)]
    if how == "swiglu":  # [gate rows of rank r] and [up rows of rank r]: 2 chunks per rank
        half = shape[0] // 2
        step = half // TP
        return [((h * half + r * step,) + zero[1:], (step,) + shape[1:], r) for r in range(TP) for h in range(2)]
    d = how[1]
    step = shape[d] // TP
    return [(tuple(r * step if i == d else 0 for i in range(len(shape))),
             tuple(step if i == d else n for i, n in enumerate(shape)), r) for r in range(TP)]


def keys() -> list[tuple[str, tuple[int, ...], torch.dtype, object, int]]:
    """(key, global shape, dtype, TP cut, PP stage) of every model tensor, in save order."""
    out = [("embedding.word_embeddings.weight", (PADDED, H), BF16, ("dim", 0), 0)]
    layer, stage = 0, 0
    for stage, n in enumerate(PP_LAYERS):
        for _ in range(n):
            spec = {**ATTN, **(DENSE_MLP if layer < DENSE else MOE)}
            out += [(f"decoder.layers.{layer}.{k}", *v, stage) for k, v in spec.items()]
            layer += 1
    last = len(PP_LAYERS) - 1
    out.append(("decoder.final_layernorm.weight", (H,), BF16, None, last))
    mtp = "mtp.layers.0."
    out += [(mtp + "enorm.weight", (H,), BF16, None, last), (mtp + "hnorm.weight", (H,), BF16, None, last),
            (mtp + "eh_proj.weight", (H, 2 * H), BF16, ("dim", 0), last)]
    out += [(f"{mtp}transformer_layer.{k}", *v, last) for k, v in {**ATTN, **MOE}.items()]
    out.append((mtp + "final_layernorm.weight", (H,), BF16, None, last))
    out.append(("output_layer.weight", (PADDED, H), BF16, ("dim", 0), last))
    return out


def write_deepseek_v3(root: Path) -> Path:
    """Write the save under `root/iter_0000001` (+ latest_checkpointed_iteration.txt); returns `root`."""
    d = root / "iter_0000001"
    d.mkdir(parents=True)
    files: dict[str, SparseFile] = {}
    sd_meta: dict = {}
    storage: dict = {}

    def file_of(stage: int, tp: int, ep: int) -> str:
        name = f"__{stage * TP * EP + ep * TP + tp}_0.distcp"  # global rank: pp-major, then dp (= ep), tp
        if name not in files:
            files[name] = SparseFile(str(d / name))
        return name

    for key, shape, dtype, how, stage in keys():
        chunks = []
        for offsets, sizes, r in _boxes(shape, how):
            name = file_of(stage, 0, r) if how == "experts" else file_of(stage, r, 0)
            item = torch.tensor([], dtype=dtype).element_size() * math.prod(sizes)
            at, length, _ = files[name].append(dtype, sizes, item)
            storage[MetadataIndex(key, torch.Size(offsets))] = _StorageInfo(name, at, length)
            chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
        sd_meta[key] = TensorStorageMetadata(TensorProperties(dtype=dtype), torch.Size(shape), chunks)
        module = key.rsplit(".", 1)[0]
        if module.endswith(TE_MODULES) and key.endswith(".weight"):  # TE's FP8 state: a bytes item per TP rank
            for r in range(TP):
                extra = f"{module}._extra_state/shard_{r}_{TP}"
                sd_meta[extra] = BytesStorageMetadata()
                at, length = files[file_of(stage, r, 0)].append_bytes(1261)  # TE's size for its FP8 meta
                storage[MetadataIndex(extra)] = _StorageInfo(file_of(stage, r, 0), at, length)
    for f in files.values():
        f.close()
    sd_meta["rng_state/shard_0.0_1.1"] = BytesStorageMetadata()
    storage[MetadataIndex("rng_state/shard_0.0_1.1")] = _StorageInfo("__0_0.distcp", 0, 1)
    meta = Metadata(sd_meta, storage_data=storage, storage_meta=StorageMeta(checkpoint_id=str(d), save_id="0"))
    (d / ".metadata").write_bytes(pickle.dumps(meta))
    (d / "metadata.json").write_text('{"sharded_backend": "torch_dist", "sharded_backend_version": 1, '
                                     '"common_backend": "torch", "common_backend_version": 1}')
    torch.save({"args": args(), "iteration": 1, "checkpoint_version": 3.0}, d / "common.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("1")
    return root
