"""Generate the tiny Megatron-Core checkpoints under tests/data/mcore/ with megatron-core itself.

Not needed at test time (the generated files are committed). Run it with a venv that holds
megatron-core 0.16.1 and a CPU torch (see README.md in this folder):

    /work/venvs/mcore/bin/python tests/data/mcore/generate.py [--only NAME ...] [--out DIR]

How each fixture is made, and why:
1. One *canonical* model per family is built at TP=PP=EP=1 in one process, its parameters drawn
   from a seeded generator at unit scale (norms 1 ± 0.2, biases nonzero: Megatron's init leaves
   norms at 1 and biases at 0, which would hide a wrong mapping), and saved as torch_dist in a
   scratch folder.
2. Each fixture runs world = TP×PP×EP processes (gloo, file:// rendezvous on loopback), builds the
   model in its layout and loads the canonical checkpoint through `dist_checkpointing.load`, so
   Megatron itself reshards it: every layout of one family holds the same global model.
3. It saves torch_dist (`dist_checkpointing.save` of {model, args, iteration, checkpoint_version,
   rng_state[, optimizer]}: the common part lands in common.pt as Megatron-LM's training loop
   writes it) and the legacy per-rank `model_optim_rng.pt` files, runs Megatron's forward on a
   fixed input (fp32 logits, vocab-gathered) and writes the global tensors read back from the
   torch_dist save with torch's own DCP reader to `reference_state.safetensors`, checking them
   against the canonical model first.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
PADDED_VOCAB = 128    # what Megatron pads to (make_vocab_size_divisible_by=128, TP-divisible)
TRUE_VOCAB = 100      # the tokenizer's size; rows 100..127 are padding
SEQ = 8
INPUT_IDS = [[3, 17, 42, 99, 0, 58, 7, 64]]   # batch 1, seq 8, all < TRUE_VOCAB
ITERATION = 1


@dataclass(frozen=True)
class Family:
    """One model, saved in several layouts (each fixture names its family)."""
    num_layers: int = 2
    hidden: int = 64
    # widths differ from hidden (64) and from each other so a transposed or mis-split tensor cannot
    # pass for a right one by shape; small, because the fixtures are committed
    ffn: int = 40                 # dense MLP width (each of gate and up with SwiGLU)
    heads: int = 4
    groups: int = 2               # query groups (GQA); == heads would be MHA
    qk_layernorm: bool = False
    qkv_bias: bool = False
    tied: bool = False
    rotary_base: int = 10000
    norm_eps: float = 1e-6
    experts: int | None = None
    topk: int = 2
    moe_ffn: int | None = None
    shared_ffn: int | None = None  # shared expert width (with a sigmoid gate, Qwen2-MoE style)
    pre_softmax: bool = False      # softmax over all experts before top-k (Qwen2-MoE), else after
    hf: dict = field(default_factory=dict)  # model_type and family-specific HF config fields


FAMILIES: dict[str, Family] = {
    "llama": Family(hf={"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    "llama3l": Family(num_layers=3, hf={"model_type": "llama", "architectures": ["LlamaForCausalLM"]}),
    "qwen3": Family(qk_layernorm=True, tied=True, rotary_base=1000000,
                    hf={"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}),
    "qwen2": Family(qkv_bias=True, tied=True, rotary_base=1000000,
                    hf={"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
    "qwen3moe": Family(qk_layernorm=True, experts=4, topk=2, moe_ffn=24, rotary_base=1000000,
                       hf={"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"]}),
    "qwen2moe": Family(qkv_bias=True, experts=4, topk=2, moe_ffn=24, shared_ffn=32, pre_softmax=True,
                       rotary_base=1000000,
                       hf={"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}),
    "mixtral": Family(experts=4, topk=2, moe_ffn=24, rotary_base=1000000,
                      hf={"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}),
}


@dataclass(frozen=True)
class Fixture:
    name: str
    family: str
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str = "float32"
    formats: tuple[str, ...] = ("torch_dist", "legacy")
    first_pp_layers: int | None = None
    last_pp_layers: int | None = None
    vocab_size: int | None = TRUE_VOCAB   # None: args.vocab_size is None (a HF-tokenizer run)
    optimizer: bool = False               # save Adam state too (readers must skip it)
    grouped: str | None = None            # "legacy": Megatron's GroupedMLP (weight1/weight2), run for
                                          # real; "te": TEGroupedMLP's weight{K} names (renamed, see notes)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep


FIXTURES: list[Fixture] = [
    Fixture("llama-gqa-tp1", "llama"),
    Fixture("llama-gqa-tp2", "llama", tp=2),
    Fixture("llama-gqa-tp1-bf16", "llama", dtype="bfloat16", optimizer=True),
    # torch_dist only: legacy TP=2 is covered by llama-gqa-tp2 (and the folder stays small)
    Fixture("qwen3-tp2", "qwen3", tp=2, vocab_size=None, formats=("torch_dist",)),
    Fixture("qwen2-tp2", "qwen2", tp=2, formats=("torch_dist",)),
    Fixture("qwen3moe-ep2", "qwen3moe", ep=2),
    Fixture("qwen2moe-tp2-ep2", "qwen2moe", tp=2, ep=2),
    Fixture("mixtral-ep2-groupedmlp-bf16", "mixtral", ep=2, dtype="bfloat16", grouped="legacy"),
    Fixture("mixtral-ep2-tegrouped-names", "mixtral", ep=2, formats=("legacy",), grouped="te"),
    Fixture("llama-pp2", "llama3l", pp=2, first_pp_layers=1, last_pp_layers=2),
]


# ---------------------------------------------------------------------------------------------
# worker side (runs inside one rank's process)

def _patch_cuda() -> None:
    """megatron-core assumes CUDA in a few places; on CPU these are harmless stand-ins."""
    import torch
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    from megatron.core.tensor_parallel import random as mrandom

    @contextlib.contextmanager
    def _no_fork(self, name=None):
        yield
    mrandom.CudaRNGStatesTracker.fork = _no_fork
    from megatron.core.transformer.moe import moe_utils
    moe_utils.te_general_gemm = None
    # GroupedMLP needs the CUDA `grouped_gemm` package; its one op is a per-expert matmul, done here in
    # torch (only the forward pass uses it: the saved weights are Megatron's own layout either way).
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    def gmm(a, b, batch_sizes, trans_b=False):
        outs, start = [], 0
        for e, n in enumerate(batch_sizes.tolist()):
            w = b[e].t() if trans_b else b[e]
            outs.append(a[start:start + n] @ w)
            start += n
        return torch.cat(outs) if outs else a.new_zeros(0, b.shape[-2 if trans_b else -1])
    gg.grouped_gemm = True
    gg.ops = type("ops", (), {"gmm": staticmethod(gmm)})


def _config(fam: Family, fx: Fixture):
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig
    kw = {}
    if fam.experts:
        kw.update(num_moe_experts=fam.experts, moe_router_topk=fam.topk, moe_ffn_hidden_size=fam.moe_ffn,
                  moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
                  moe_router_pre_softmax=fam.pre_softmax, moe_aux_loss_coeff=0.0,
                  expert_model_parallel_size=fx.ep)
        if fam.shared_ffn:
            kw.update(moe_shared_expert_intermediate_size=fam.shared_ffn, moe_shared_expert_gate=True)
    if fx.pp > 1:
        kw.update(pipeline_dtype=torch.float32, num_layers_in_first_pipeline_stage=fx.first_pp_layers,
                  num_layers_in_last_pipeline_stage=fx.last_pp_layers)
    return TransformerConfig(
        num_layers=fam.num_layers, hidden_size=fam.hidden, ffn_hidden_size=fam.ffn,
        num_attention_heads=fam.heads, num_query_groups=fam.groups, kv_channels=fam.hidden // fam.heads,
        normalization="RMSNorm", layernorm_epsilon=fam.norm_eps, gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=fam.qkv_bias,
        qk_layernorm=fam.qk_layernorm, tensor_model_parallel_size=fx.tp, pipeline_model_parallel_size=fx.pp,
        use_cpu_initialization=True, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, gradient_accumulation_fusion=False, bf16=fx.dtype == "bfloat16",
        moe_grouped_gemm=fx.grouped == "legacy", **kw)


def _build(fam: Family, fx: Fixture):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    spec = get_gpt_layer_local_spec(num_experts=fam.experts, moe_grouped_gemm=fx.grouped == "legacy",
                                    qk_layernorm=fam.qk_layernorm, normalization="RMSNorm")
    return GPTModel(config=_config(fam, fx), transformer_layer_spec=spec, vocab_size=PADDED_VOCAB,
                    max_sequence_length=64, pre_process=ps.is_pipeline_first_stage(),
                    post_process=ps.is_pipeline_last_stage(), parallel_output=False,
                    share_embeddings_and_output_weights=fam.tied, position_embedding_type="rope",
                    rotary_base=fam.rotary_base, rotary_percent=1.0)


def _randomize(model) -> None:
    """Unit-scale weights from a seeded generator (canonical model only, TP=PP=EP=1)."""
    import torch
    gen = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:  # Linear [out, in]: 1/sqrt(fan_in) keeps activations O(1)
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)


def _args(fam: Family, fx: Fixture):
    """The Namespace Megatron-LM's training loop pickles (the fields a converter reads, spelled as
    Megatron-LM's argument parser spells them, plus a few of the others it carries)."""
    import torch
    dtype = getattr(torch, fx.dtype)
    return argparse.Namespace(
        num_layers=fam.num_layers, hidden_size=fam.hidden, ffn_hidden_size=fam.ffn,
        num_attention_heads=fam.heads, num_query_groups=fam.groups,
        group_query_attention=fam.groups != fam.heads, kv_channels=fam.hidden // fam.heads,
        swiglu=True, normalization="RMSNorm", norm_epsilon=fam.norm_eps,
        position_embedding_type="rope", rotary_base=fam.rotary_base, rotary_percent=1.0,
        use_rotary_position_embeddings=True, add_bias_linear=False, add_qkv_bias=fam.qkv_bias,
        qk_layernorm=fam.qk_layernorm, untie_embeddings_and_output_weights=not fam.tied,
        padded_vocab_size=PADDED_VOCAB, vocab_size=fx.vocab_size, make_vocab_size_divisible_by=128,
        max_position_embeddings=64, seq_length=SEQ,
        tensor_model_parallel_size=fx.tp, pipeline_model_parallel_size=fx.pp,
        expert_model_parallel_size=fx.ep, expert_tensor_parallel_size=fx.tp,
        data_parallel_size=1, world_size=fx.world,
        num_experts=fam.experts, moe_router_topk=fam.topk if fam.experts else 2,
        moe_ffn_hidden_size=fam.moe_ffn, moe_shared_expert_intermediate_size=fam.shared_ffn,
        moe_shared_expert_gate=bool(fam.shared_ffn), moe_router_pre_softmax=fam.pre_softmax,
        moe_grouped_gemm=fx.grouped is not None, moe_token_dispatcher_type="allgather",
        params_dtype=dtype, bf16=fx.dtype == "bfloat16", fp16=fx.dtype == "float16",
        decoder_first_pipeline_num_layers=fx.first_pp_layers,
        decoder_last_pipeline_num_layers=fx.last_pp_layers,
        tokenizer_type="HuggingFaceTokenizer" if fx.vocab_size is None else "NullTokenizer",
        tokenizer_model="/models/tiny-tokenizer" if fx.vocab_size is None else None,
        transformer_impl="local", use_cpu_initialization=True, ckpt_format="torch_dist",
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        iteration=ITERATION, consumed_train_samples=8, save="/checkpoints/" + fx.name, load=None)


def _rng_state() -> list[dict]:
    """What Megatron-LM's get_rng_state saves (numpy's state pickles numpy globals, on purpose)."""
    import numpy as np
    import torch
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state().clone(),
             "rng_tracker_states": {}}]


def _forward(model, fx: Fixture):
    import torch
    ids = torch.tensor(INPUT_IDS, dtype=torch.long)
    pos = torch.arange(SEQ).unsqueeze(0)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True = masked
    model.eval()
    with torch.no_grad():
        return model(ids, pos, mask).float()


def _optimizer(model):
    import torch
    params = [p for p in model.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    opt.step()  # moves the weights: restored right after by the caller
    for p in params:
        p.grad = None
    return opt


def _save_torch_dist(model, fam, fx, root: Path, opt) -> None:
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor
    msd = model.sharded_state_dict()
    sd = {"model": msd, "args": _args(fam, fx), "iteration": ITERATION, "checkpoint_version": 3.0,
          "rng_state": ShardedObject("rng_state", _rng_state(), (fx.pp, fx.tp),
                                     (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                                     replica_id=ps.get_data_parallel_rank(with_context_parallel=True)),
          "num_floating_point_operations_so_far": 0}
    if opt is not None:  # Megatron's non-distributed optimizer layout: optimizer.state.<name>.<model key>
        state = {}
        by_param = {id(p): n for n, p in model.named_parameters()}
        flat = {}
        for k, v in msd.items():
            flat[k] = v
        for p, st in opt.state.items():
            pname = by_param[id(p)]
            sh = next((v for v in flat.values() if getattr(v, "data", None) is p), None)
            if sh is None:
                continue
            for slot in ("exp_avg", "exp_avg_sq"):
                state[f"{slot}.{pname}"] = make_sharded_optimizer_tensor(sh, st[slot], f"optimizer.state.{slot}")
        sd["optimizer"] = {"state": state, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]}
    d = root / f"iter_{ITERATION:07d}"
    if torch.distributed.get_rank() == 0:
        d.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(sd, str(d))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def _te_grouped_names(sd: dict) -> dict:
    """SequentialMLP's local expert keys renamed to what TEGroupedMLP's state_dict holds (TE cannot run
    here): `mlp.experts.linear_fc{1,2}.weight{k}` for local expert k, one `_extra_state` per GroupedLinear
    (the tensors are the same [out, in] TP-local per-expert weights; only the names differ)."""
    import re
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"(.*\.mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|_extra_state)", k)
        if not m:
            out[k] = v
        elif m[4] == "weight":
            out[f"{m[1]}{m[3]}.weight{m[2]}"] = v
        else:
            out[f"{m[1]}{m[3]}._extra_state"] = None
    return out


def _save_legacy(model, fam, fx, root: Path, opt) -> None:
    import torch
    from megatron.core import parallel_state as ps
    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    ep = ps.get_expert_model_parallel_rank()
    name = f"mp_rank_{tp:02d}" + (f"_{pp:03d}" if fx.pp > 1 else "") + (f"_{ep:03d}" if fx.ep > 1 else "")
    d = root / f"iter_{ITERATION:07d}" / name
    d.mkdir(parents=True, exist_ok=True)
    sd = {"args": _args(fam, fx), "checkpoint_version": 3.0, "iteration": ITERATION,
          "model": _te_grouped_names(model.state_dict_for_save_checkpoint()) if fx.grouped == "te"
          else model.state_dict_for_save_checkpoint(),
          "optimizer": {"optimizer": opt.state_dict() if opt is not None else {"state": {}, "param_groups": []},
                        "grad_scaler": None},
          "opt_param_scheduler": {"max_lr": 1e-3, "min_lr": 0.0, "num_steps": 8},
          "rng_state": _rng_state(), "num_floating_point_operations_so_far": 0}
    torch.save(sd, d / "model_optim_rng.pt")
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))


def _read_global(ckpt_dir: Path) -> dict:
    """Global model tensors of a torch_dist save, read by torch's own DCP reader (no Megatron)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as t:
        dcp_to_torch_save(str(ckpt_dir), f"{t}/all.pt")
        full = torch.load(f"{t}/all.pt", weights_only=False)
    return {k: v for k, v in full.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}


def _t(msg: str) -> None:
    if os.environ.get("MCORE_GEN_TRACE"):
        print(f"[{time.time() % 1000:7.2f} rank {os.environ['RANK']}] {msg}", file=sys.stderr, flush=True)


def worker(fx_name: str, out: Path, canon: Path) -> None:
    _t("start")
    import torch
    import torch.distributed as dist
    _patch_cuda()
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    is_canon = fx_name.startswith("canon:")
    if is_canon:
        fx = Fixture(fx_name, fx_name[6:], formats=("torch_dist",))
    elif fx_name.startswith("_logits_"):
        fx = Fixture(fx_name, fx_name[8:], formats=())
    else:
        fx = next(f for f in FIXTURES if f.name == fx_name)
    fam = FAMILIES[fx.family]
    dist.init_process_group("gloo", init_method=f"file://{os.environ['RDZV_FILE']}", rank=rank, world_size=world)
    ps.initialize_model_parallel(tensor_model_parallel_size=fx.tp, pipeline_model_parallel_size=fx.pp,
                                 expert_model_parallel_size=fx.ep)
    torch.manual_seed(0)
    _t("init")
    model = _build(fam, fx)
    _t("built")
    if is_canon:
        _randomize(model)
        _save_torch_dist(model, fam, fx, canon, None)
        return
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(canon / f"iter_{ITERATION:07d}"))
    for k in ("args", "iteration", "checkpoint_version", "num_floating_point_operations_so_far", "rng_state"):
        loaded.pop(k, None)  # the canonical save's common part, not model state
    model.load_state_dict(loaded, strict=True)
    if fx.dtype != "float32":
        model.to(getattr(torch, fx.dtype))
    _t("loaded")
    logits = _forward(model, fx) if fx.pp == 1 else None
    opt = None
    if fx.optimizer:
        keep = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = _optimizer(model)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(keep[n])
    fdir = out / fx.name
    if "torch_dist" in fx.formats:
        _save_torch_dist(model, fam, fx, fdir / "torch_dist", opt)
    if "legacy" in fx.formats:
        _save_legacy(model, fam, fx, fdir / "legacy", opt)
    _t("saved")
    if rank == 0 and logits is not None:
        torch.save({"input_ids": torch.tensor(INPUT_IDS), "logits": logits.contiguous()},
                   fdir / "reference_logits.pt")
    dist.barrier()
    dist.destroy_process_group()
    _t("done")


# ---------------------------------------------------------------------------------------------
# driver side

def _run_ranks(target: str, world: int, out: Path, canon: Path) -> None:
    with tempfile.TemporaryDirectory() as t:
        procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                       GLOO_SOCKET_IFNAME="lo", PYTHONWARNINGS="ignore", RDZV_FILE=f"{t}/rdzv", OMP_NUM_THREADS="1",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT="29531")
            procs.append(subprocess.Popen([sys.executable, __file__, "--worker", target,
                                           "--out", str(out), "--canon", str(canon)], env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"error: {target}: ranks exited with {codes}")


def _hf_config(fam: Family, fx: Fixture) -> dict:
    cfg = dict(fam.hf)
    cfg.update(vocab_size=TRUE_VOCAB, hidden_size=fam.hidden, intermediate_size=fam.ffn,
               num_hidden_layers=fam.num_layers, num_attention_heads=fam.heads,
               num_key_value_heads=fam.groups, head_dim=fam.hidden // fam.heads, hidden_act="silu",
               max_position_embeddings=64, rms_norm_eps=fam.norm_eps, rope_theta=float(fam.rotary_base),
               tie_word_embeddings=fam.tied, attention_bias=fam.qkv_bias, torch_dtype=fx.dtype,
               bos_token_id=None, eos_token_id=None)
    if fam.hf["model_type"] in ("qwen2", "qwen2_moe"):
        del cfg["attention_bias"]  # Qwen2 always has q/k/v biases and no o_proj bias
        cfg.update(use_sliding_window=False)
    if fam.experts:
        cfg["num_experts_per_tok"] = fam.topk
        if fam.hf["model_type"] == "mixtral":
            cfg.update(num_local_experts=fam.experts, intermediate_size=fam.moe_ffn)
        else:
            cfg.update(num_experts=fam.experts, moe_intermediate_size=fam.moe_ffn, decoder_sparse_step=1,
                       mlp_only_layers=[], norm_topk_prob=not fam.pre_softmax, output_router_logits=False)
        if fam.shared_ffn:
            cfg["shared_expert_intermediate_size"] = fam.shared_ffn
    return cfg


def _fixture_record(fx: Fixture, fam: Family, fdir: Path) -> dict:
    """What the fixture is, for tests and README: layout, versions, the files each format holds."""
    import megatron.core
    import torch
    rec = {"name": fx.name, "family": fx.family, "hf_model_type": fam.hf["model_type"], "tp": fx.tp,
           "pp": fx.pp, "ep": fx.ep, "dtype": fx.dtype, "formats": list(fx.formats),
           "num_layers": fam.num_layers, "padded_vocab_size": PADDED_VOCAB, "true_vocab_size": TRUE_VOCAB,
           "args_vocab_size": fx.vocab_size, "first_pp_layers": fx.first_pp_layers,
           "last_pp_layers": fx.last_pp_layers, "optimizer_state": fx.optimizer, "iteration": ITERATION,
           "grouped_gemm": fx.grouped, "notes": {
               "legacy": ["GroupedMLP (moe_grouped_gemm, no TE): legacy keys mlp.experts.weight1/weight2"],
               "te": ["TEGroupedMLP names weight{K} made by renaming (TE does not run on CPU)"]}.get(fx.grouped, []),
           "megatron_core": megatron.core.__version__, "torch": torch.__version__,
           "logits": "megatron forward of this layout" if fx.pp == 1 else "megatron forward at PP=1 (same model)",
           "files": sorted({str(p.relative_to(fdir)) for p in fdir.rglob("*") if p.is_file()}
                           | {"fixture.json", "hf_config.json", "reference_logits.pt"})}
    return rec


def _write_reference(fx: Fixture, fam: Family, out: Path, canon_state: dict) -> None:
    import torch
    from safetensors.torch import save_file
    fdir = out / fx.name
    if "torch_dist" in fx.formats:
        state = _read_global(fdir / "torch_dist" / f"iter_{ITERATION:07d}")
    else:  # no torch_dist save of this fixture: the canonical one holds the same global model
        state = {k: v.to(getattr(torch, fx.dtype)) for k, v in canon_state.items()}
    if set(state) != set(canon_state):
        raise SystemExit(f"error: {fx.name}: keys differ from the canonical model: "
                         f"{sorted(set(state) ^ set(canon_state))}")
    for k, v in state.items():  # every layout of a family holds the same global model
        if not torch.equal(v, canon_state[k].to(v.dtype)):
            raise SystemExit(f"error: {fx.name}: {k} differs from the canonical model")
    save_file({k: v.contiguous() for k, v in sorted(state.items())}, str(fdir / "reference_state.safetensors"),
              metadata={"source": "torch.distributed.checkpoint read of the torch_dist save (global tensors)"})
    (fdir / "hf_config.json").write_text(json.dumps(_hf_config(fam, fx), indent=2, sort_keys=True) + "\n")
    if fx.pp > 1:  # Megatron's PP forward needs its pipeline schedule: take the PP=1 canonical logits
        shutil.copy(out / ".canon_logits" / f"{fx.family}.pt", fdir / "reference_logits.pt")
    (fdir / "fixture.json").write_text(json.dumps(_fixture_record(fx, fam, fdir), indent=2) + "\n")


def _canon_logits(family: str, out: Path, canon: Path) -> None:
    """Logits of the canonical model (for PP fixtures), by a one-rank TP=1 fixture of the family."""
    tmp = Fixture(f"_logits_{family}", family, formats=())
    (out / tmp.name).mkdir(parents=True, exist_ok=True)
    _run_ranks(tmp.name, 1, out, canon)
    (out / ".canon_logits").mkdir(exist_ok=True)
    shutil.move(str(out / tmp.name / "reference_logits.pt"), out / ".canon_logits" / f"{family}.pt")
    shutil.rmtree(out / tmp.name)


def write_readme_table(out: Path) -> None:
    """Rewrite the fixture table of README.md (between its markers) from every fixture.json."""
    rows = ["| fixture | HF model_type | formats | TP | PP | EP | dtype | layers | notes |",
            "|---|---|---|---|---|---|---|---|---|"]
    for rec_path in sorted(out.glob("*/fixture.json")):
        r = json.loads(rec_path.read_text())
        size = sum(p.stat().st_size for p in rec_path.parent.rglob("*") if p.is_file())
        notes = [f"{size // 1024} KiB"]
        if r["pp"] > 1:
            notes.append(f"stages {r['first_pp_layers']}+{r['last_pp_layers']} layers")
        if r["args_vocab_size"] is None:
            notes.append("args.vocab_size None")
        if r["optimizer_state"]:
            notes.append("Adam state saved")
        notes += r.get("notes", [])
        rows.append(f"| `{r['name']}` | {r['hf_model_type']} | {', '.join(r['formats'])} | {r['tp']} | {r['pp']} "
                    f"| {r['ep']} | {r['dtype']} | {r['num_layers']} | {'; '.join(notes)} |")
    readme = out / "README.md"
    text = readme.read_text()
    head, rest = text.split("<!-- fixtures -->", 1)
    _, tail = rest.split("<!-- /fixtures -->", 1)
    readme.write_text(head + "<!-- fixtures -->\n" + "\n".join(rows) + "\n<!-- /fixtures -->" + tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="fixture names (default: all)")
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--canon", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, a.out, a.canon)
        return
    fixtures = [f for f in FIXTURES if not a.only or f.name in a.only]
    with tempfile.TemporaryDirectory() as scratch:
        for family in sorted({f.family for f in fixtures}):
            t0 = time.time()
            canon = Path(scratch) / family
            _run_ranks(f"canon:{family}", 1, a.out, canon)
            canon_state = _read_global(canon / f"iter_{ITERATION:07d}")
            if any(f.pp > 1 for f in fixtures if f.family == family):
                _canon_logits(family, a.out, canon)
            for fx in (f for f in fixtures if f.family == family):
                t1 = time.time()
                if (a.out / fx.name).exists():
                    shutil.rmtree(a.out / fx.name)
                _run_ranks(fx.name, fx.world, a.out, canon)
                _write_reference(fx, FAMILIES[family], a.out, canon_state)
                print(f"{fx.name}: {time.time() - t1:.1f}s", flush=True)
            print(f"family {family}: {time.time() - t0:.1f}s", flush=True)
        shutil.rmtree(a.out / ".canon_logits", ignore_errors=True)
    write_readme_table(a.out)


if __name__ == "__main__":
    main()
