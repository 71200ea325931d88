"""The seed-000 approach, for comparison: whole files in memory, naive dequant, save_file.

Per shard: `load_file`, every FP8 weight times its scale repeated over the whole tensor
(`repeat_interleave`, float32), `save_file`; scales looked up in other shards by loading those
files too (cached, as the seed does). CPU only. Usage: baseline_dequant.py SRC DEST
"""
from __future__ import annotations

import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file


def naive_dequant(w: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    rows, cols = w.shape
    full = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]
    return (w.to(torch.float32) * full).to(torch.bfloat16)


def main(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))
    weight_map = index["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}

    def get(name: str) -> torch.Tensor:
        f = weight_map[name]
        if f not in loaded:
            loaded[f] = load_file(os.path.join(src, f))
        return loaded[f][name]

    dropped = []
    for f in sorted(set(weight_map.values())):
        state = load_file(os.path.join(src, f))
        loaded[f] = state
        out = {}
        for name, t in state.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                out[name] = naive_dequant(t, get(name + "_scale_inv"))
                dropped.append(name + "_scale_inv")
            else:
                out[name] = t
        if out:
            save_file(out, os.path.join(dst, f), metadata={"format": "pt"})
        if len(loaded) > 2:  # the seed keeps a small cache of loaded files
            loaded.pop(next(iter(loaded)))
    for name in dropped:
        weight_map.pop(name, None)
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from ckptflow.tasks.run.summary import peak_rss_bytes  # VmHWM: ru_maxrss would include the parent's peak

    print(json.dumps({"peak_rss_bytes": peak_rss_bytes()}))
