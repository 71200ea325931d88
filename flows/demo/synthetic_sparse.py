"""A DeepSeek-V3-671B-scale checkpoint made of sparse files: real headers, holes for data.

91,991 tensors (61 layers, 256 routed experts, FP8 weights with block scales, the MTP layer) in
163 shards of ~4.3 GB each, as the real release has them. Each file is its real header followed
by a hole (`truncate`): ~700 GB apparent, a few MB on disk. Planning, `validate` and
`--dry-run` read only headers, so they see the real thing; reading a tensor gives zeros.

    python -m ckptflow.flows.demo.synthetic_sparse DIR
"""
from __future__ import annotations

import os
import sys

from ckptflow.storage.files import CONFIG_NAME, INDEX_NAME, index_document
from ckptflow.storage.safetensors_format import TensorSpec, build_header

from ckptflow.flows.demo.synthetic import DeepSeekDims, deepseek_config, deepseek_entries

DEEPSEEK_V3 = DeepSeekDims(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                           moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
                           num_attention_heads=128, n_routed_experts=256, n_shared_experts=1,
                           num_experts_per_tok=8, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                           qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=1)
SHARDS = 163


def make_sparse_deepseek_v3(root: str, shards: int = SHARDS) -> dict[str, int]:
    """Write the checkpoint under local directory `root`; returns {"tensors", "files", "bytes"}."""
    from ckptflow.tasks.kernels.dtype_map import TORCH_TO_ST

    entries = [e for group in deepseek_entries(DEEPSEEK_V3) for e in group]  # makers never called
    specs = [TensorSpec(name, TORCH_TO_ST[dtype], shape) for name, dtype, shape, _ in entries]
    total = sum(s.nbytes for s in specs)
    target = total / shards
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:  # in model order, a new file once this one holds its share
        if size >= target and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    os.makedirs(root, exist_ok=True)
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        name = f"model-{k:05d}-of-{len(groups):06d}.safetensors"
        header = build_header(group, {"format": "pt"})
        with open(os.path.join(root, name), "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(s.nbytes for s in group))  # a hole: no data blocks
        weight_map.update({s.name: name for s in group})
    import json

    with open(os.path.join(root, INDEX_NAME), "w") as f:
        json.dump(index_document(weight_map, total), f)
    with open(os.path.join(root, CONFIG_NAME), "w") as f:
        json.dump(deepseek_config(DEEPSEEK_V3), f)
    return {"tensors": len(specs), "files": len(groups), "bytes": total}


if __name__ == "__main__":
    print(make_sparse_deepseek_v3(sys.argv[1]))
