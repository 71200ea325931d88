"""Write a Hugging Face GPT-2 as the Megatron-LM checkpoints it could have come from.

This is the inverse of `ckptflow.tasks.megatron.mapping`, written independently (row index lists instead of
views and permutes) so a shared mistake cannot cancel out: Conv1D [in, out] → Linear [out, in],
fused QKV rows in each `checkpoint_version`'s saved layout, vocab padded with random rows,
tensor-parallel ranks split the way Megatron's column/row-parallel layers hold them.
"""
from __future__ import annotations

import argparse
import io
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32, n_layer: int = 2, tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=n_layer, n_head=4, vocab_size=100, n_positions=64,
                     activation_function="gelu_new", bos_token_id=None, eos_token_id=None,
                     tie_word_embeddings=tied)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # GPT-2 initialises layernorms to 1/0 and biases to 0: make them count
        for name, p in model.named_parameters():
            if "ln_" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def _qkv_rows(version: float, heads: range, n_head: int, head_dim: int) -> list[int]:
    """Rows of the [3*E, E] Linear weight (q rows, then k, then v; head-major in each) that one
    rank holding `heads` stores, in the order `version` saves them."""
    embd = n_head * head_dim

    def row(s: int, h: int, d: int) -> int:
        return s * embd + h * head_dim + d
    if version == 0:      # [3, heads, hd]
        return [row(s, h, d) for s in range(3) for h in heads for d in range(head_dim)]
    if version == 1.0:    # [heads, hd, 3]
        return [row(s, h, d) for h in heads for d in range(head_dim) for s in range(3)]
    return [row(s, h, d) for h in heads for s in range(3) for d in range(head_dim)]  # [heads, 3, hd]


def megatron_models(model, version: float, tp: int, padded_vocab: int = 128,
                    new_names: bool | None = None, seed: int = 1) -> list[dict[str, Any]]:
    """Each rank's `model` entry (nested, as Megatron's state_dict_for_save_checkpoint makes it)."""
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config
    n_head, embd = cfg.n_head, cfg.n_embd
    head_dim = embd // n_head
    new_names = version >= 2.0 if new_names is None else new_names
    stack, attn = ("encoder", "self_attention") if new_names else ("transformer", "attention")
    gen = torch.Generator().manual_seed(seed)
    wte = sd["transformer.wte.weight"]
    pad = torch.randn(padded_vocab - wte.shape[0], embd, generator=gen).to(wte.dtype)
    wte = torch.cat([wte, pad])
    head = None if cfg.tie_word_embeddings else torch.cat([sd["lm_head.weight"], pad.flip(0)])
    ranks = []
    for r in range(tp):
        def col(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(tp, dim=0)[r].clone()  # clone: torch.save writes a view's whole storage

        def row(t: torch.Tensor) -> torch.Tensor:
            return t.chunk(tp, dim=1)[r].clone()
        local = range(r * n_head // tp, (r + 1) * n_head // tp)
        rows = torch.tensor(_qkv_rows(version, local, n_head, head_dim))
        layers: dict[str, torch.Tensor] = {}
        for i in range(cfg.n_layer):
            h, p = f"transformer.h.{i}.", f"layers.{i}."
            layers[p + "input_layernorm.weight"] = sd[h + "ln_1.weight"].clone()
            layers[p + "input_layernorm.bias"] = sd[h + "ln_1.bias"].clone()
            layers[p + f"{attn}.query_key_value.weight"] = sd[h + "attn.c_attn.weight"].t()[rows].clone()
            layers[p + f"{attn}.query_key_value.bias"] = sd[h + "attn.c_attn.bias"][rows].clone()
            layers[p + f"{attn}.dense.weight"] = row(sd[h + "attn.c_proj.weight"].t())
            layers[p + f"{attn}.dense.bias"] = sd[h + "attn.c_proj.bias"].clone()
            layers[p + "post_attention_layernorm.weight"] = sd[h + "ln_2.weight"].clone()
            layers[p + "post_attention_layernorm.bias"] = sd[h + "ln_2.bias"].clone()
            layers[p + "mlp.dense_h_to_4h.weight"] = col(sd[h + "mlp.c_fc.weight"].t())
            layers[p + "mlp.dense_h_to_4h.bias"] = col(sd[h + "mlp.c_fc.bias"])
            layers[p + "mlp.dense_4h_to_h.weight"] = row(sd[h + "mlp.c_proj.weight"].t())
            layers[p + "mlp.dense_4h_to_h.bias"] = sd[h + "mlp.c_proj.bias"].clone()
        layers["final_layernorm.weight"] = sd["transformer.ln_f.weight"].clone()
        layers["final_layernorm.bias"] = sd["transformer.ln_f.bias"].clone()
        lm: dict[str, Any] = {
            "embedding": {"word_embeddings": {"weight": col(wte)},
                          "position_embeddings": {"weight": sd["transformer.wpe.weight"].clone()}},
            stack: layers}
        if head is not None:  # --untie-embeddings-and-output-weights: a column-parallel output layer
            lm["output_layer"] = {"weight": col(head)}
        ranks.append({"language_model": lm})
    return ranks


def megatron_args(model, tp: int, padded_vocab: int = 128, **extra: Any) -> argparse.Namespace:
    cfg = model.config
    args = dict(num_layers=cfg.n_layer, hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                ffn_hidden_size=4 * cfg.n_embd, max_position_embeddings=cfg.n_positions,
                padded_vocab_size=padded_vocab, tokenizer_type="GPT2BPETokenizer",
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                bias_gelu_fusion=False, openai_gelu=True, layernorm_epsilon=cfg.layer_norm_epsilon,
                hidden_dropout=0.1, attention_dropout=0.1, init_method_std=0.02,
                params_dtype=model.dtype, fp16=model.dtype == torch.float16, iteration=10)
    args.update(extra)
    return argparse.Namespace(**args)


def rank_file(model_entry: dict[str, Any], args: Any, version: float | None) -> dict[str, Any]:
    """A whole model_optim_rng.pt payload: model, args, optimizer, RNG states as Megatron saves."""
    sd: dict[str, Any] = {"args": args, "iteration": 10, "model": model_entry,
                          "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}},
                                        "param_groups": [{"lr": 1e-4, "params": [0]}]},
                          "rng_state": [{"random_rng_state": random.getstate(),
                                         "np_rng_state": np.random.get_state(),
                                         "torch_rng_state": torch.get_rng_state(),
                                         "rng_tracker_states": {}}]}
    if version is not None:  # version 0 checkpoints predate the field
        sd["checkpoint_version"] = version
    return sd


def save(obj: Any, path: Path, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def write_tree(root: Path, payloads: list[dict[str, Any]], tracker: str | None = "release") -> Path:
    """`<root>/latest_checkpointed_iteration.txt` + `<release|iter_N>/mp_rank_XX/model_optim_rng.pt`."""
    sub = "release" if tracker in (None, "release") else f"iter_{int(tracker):07d}"
    for r, payload in enumerate(payloads):
        save(payload, root / sub / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    if tracker is not None:
        (root / "latest_checkpointed_iteration.txt").write_text(tracker)
    return root


def write_zip(path: Path, payloads: list[dict[str, Any]], prefix: str = "") -> Path:
    """Like NVIDIA's megatron_lm_345m_v0.0.zip: the tree above, zipped (deflated)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(prefix + "latest_checkpointed_iteration.txt", "release")
        for r, payload in enumerate(payloads):
            buf = io.BytesIO()
            torch.save(payload, buf)
            zf.writestr(f"{prefix}release/mp_rank_{r:02d}/model_optim_rng.pt", buf.getvalue())
    return path


# ---- hostile inputs: tiny files that ask a loader for gigabytes --------------------------------

class Reduce:
    """Pickles as `fn(*args)`: how a forged checkpoint makes torch's own unpickler allocate."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.fn, self.args


def expanded_payload(model, elements: int = 750_000_000) -> dict[str, Any]:
    """A real rank file whose final layernorm is `zeros(1).expand(n)`: torch.save keeps the 4-byte
    storage and the stride 0, so the file stays small while the tensor stands for 4n bytes."""
    p = rank_file(megatron_models(model, 3.0, tp=1)[0], megatron_args(model, tp=1), 3.0)
    p["model"]["language_model"]["encoder"]["final_layernorm.weight"] = torch.zeros(1).expand(elements)
    return p


def payload_with(model, where: str, obj: Any) -> dict[str, Any]:
    """A real rank file with `obj` as its `where` entry, e.g. Reduce(bytearray, 3_000_000_000)."""
    p = rank_file(megatron_models(model, 3.0, tp=1)[0], megatron_args(model, tp=1), 3.0)
    p[where] = {"buffer": obj}
    return p


_BLOCK = 16 << 20  # zeros per deflate block; a full flush makes each block's bytes the same


def write_zip_bomb(path: Path, blocks: int, declared: int | None = None,
                   member: str = "release/mp_rank_00/model_optim_rng.pt") -> Path:
    """A Megatron-shaped archive (tracker + one rank file) whose rank file inflates to
    `blocks` x 16 MiB of zeros (~1030x deflate). `declared`: the size its zip directory claims
    instead (a lying directory). Written by hand: one compressed block repeated, ~1 s for 3 GB."""
    import struct
    import zlib

    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = comp.compress(bytes(_BLOCK)) + comp.flush(zlib.Z_FULL_FLUSH)
    tail = comp.flush()
    crc, zeros = 0, bytes(_BLOCK)
    for _ in range(blocks):
        crc = zlib.crc32(zeros, crc)
    size = blocks * _BLOCK
    entries = [("latest_checkpointed_iteration.txt".encode(), 0, zlib.crc32(b"release"), 7, 7, [b"release"]),
               (member.encode(), 8, crc, blocks * len(block) + len(tail), declared or size,
                [block] * blocks + [tail])]
    central, offset = [], 0
    with open(path, "wb") as f:
        for name, method, crc_, csize, usize, chunks in entries:
            f.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, method, 0, 33, crc_, csize, usize,
                                len(name), 0) + name)
            for chunk in chunks:
                f.write(chunk)
            central.append(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, method, 0, 33, crc_,
                                       csize, usize, len(name), 0, 0, 0, 0, 0o644 << 16, offset) + name)
            offset = f.tell()
        f.write(b"".join(central))
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(central), len(central),
                            sum(map(len, central)), offset, 0))
    return path


MEASURE = ("import resource, subprocess, sys\n"
           "rc = subprocess.call(sys.argv[2:])\n"
           "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))\n"
           "sys.exit(rc)\n")


def run_cli_measured(args: list[str], python: str, cwd: Path, env: dict[str, str], rss_file: Path,
                     timeout: float = 600):
    """`python -m ckptflow.flows.cli ARGS` through a wrapper that records the peak RSS (bytes) of the CLI
    and every process it waited for; (completed process, peak RSS, seconds)."""
    import subprocess
    import time

    t0 = time.perf_counter()
    run = subprocess.run([python, "-c", MEASURE, str(rss_file), python, "-m", "ckptflow.flows.cli", *args], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=timeout)
    return run, int(rss_file.read_text()), time.perf_counter() - t0


def clean_ranks(model, tp: int = 1) -> list[dict[str, Any]]:
    return [rank_file(m, megatron_args(model, tp), 3.0) for m in megatron_models(model, 3.0, tp)]


def tracker_tree(root: Path, model, text: str | None = None, size: int | None = None) -> Path:
    """A clean checkpoint directory whose tracker file holds `text`, or `size` NULs (sparse)."""
    write_tree(root, clean_ranks(model))
    tracker = root / "latest_checkpointed_iteration.txt"
    if text is not None:
        tracker.write_text(text)
    if size is not None:  # a sparse file: gigabytes of NULs that take no disk
        with open(tracker, "wb") as f:
            f.truncate(size)
    return root


def hostile_sources(zip_blocks: int = 90) -> dict[str, tuple[Any, str]]:
    """name → (build(folder, model) → SOURCE path, regex the one `error:` line must match).
    Each SOURCE is at most a few MB and asks the loader for 1.5–3 GB."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    rank0 = r"mp_rank_00/model_optim_rng\.pt"
    member = r"zip://release/mp_rank_00/model_optim_rng\.pt::\S+megatron\.zip"
    tracker = r"ckpt: latest_checkpointed_iteration\.txt holds more than 64 bytes"
    return {
        "expanded_tensor": (lambda d, m: write_tree(d / "ckpt", [expanded_payload(m)]),
                            rf"{rank0}: tensor model\.language_model\.encoder\.final_layernorm\.weight has "
                            r"shape \[750000000\] and strides \[0\] over a storage of 1 "),
        "bytearray": (lambda d, m: write_tree(d / "ckpt", [payload_with(m, "optimizer",
                                                                          Reduce(bytearray, 3_000_000_000))]),
                      rf"{rank0}: refused: its pickle asks for bytearray\(3000000000\)"),
        "numpy_objects": (lambda d, m: write_tree(d / "ckpt", [payload_with(
            m, "rng_state", Reduce(_reconstruct, np.ndarray, (400_000_000,), b"O"))]),
            rf"{rank0}: refused: its pickle builds a numpy array of shape \[400000000\] \(3\.2 GB\)"),
        "zip_bomb": (lambda d, m: write_zip_bomb(d / "megatron.zip", blocks=zip_blocks),
                     rf"{member}: would inflate \S+ MB to \S+ GB"),
        "zip_lying_directory": (lambda d, m: write_zip_bomb(d / "megatron.zip", zip_blocks, declared=1 << 20),
                                rf"{member}: the archive member cannot be inflated \(Bad CRC-32"),
        "tracker_1_5GB": (lambda d, m: tracker_tree(d / "ckpt", m, size=1_500_000_000), tracker),
        "tracker_5000_digits": (lambda d, m: tracker_tree(d / "ckpt", m, text="7" * 5000), tracker),
    }


def forged_torch_file(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A torch.save zip-format file around a hand-written pickle (what no torch.save writes)."""
    with zipfile.ZipFile(path, "w") as zf:  # stored, as torch writes its records
        zf.writestr("archive/data.pkl", data_pkl)
        for name, data in {"byteorder": b"little", **(records or {})}.items():
            zf.writestr(f"archive/{name}", data)
        zf.writestr("archive/version", b"3\n")
    return path
