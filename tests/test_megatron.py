"""Megatron-LM GPT-2 → HF GPT-2: round trips through every checkpoint shape, and safe loading."""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import types
import warnings
import zipfile
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import save_file

from ckptflow.tasks.megatron.load import (MegatronEnum, MegatronLoadError, UnsafeCheckpointError,
                                          find_rank_files, load_megatron)
from ckptflow.tasks.megatron.mapping import MegatronConvertError, convert_megatron, qkv_split_major
from .megatron_fixtures import (megatron_args, megatron_models, rank_file, save, tiny_gpt2,
                                     write_tree, write_zip)

VOCAB = {"vocab_size": 100}  # args only know padded_vocab_size (128); the tokenizer's size is 100


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


def payloads(model, version: float, tp: int, **args):
    return [rank_file(m, megatron_args(model, tp, **args), version or None)
            for m in megatron_models(model, version, tp)]


def write(kind: str, tmp: Path, model, version: float, tp: int) -> str:
    files = payloads(model, version, tp)
    if kind == "pt":
        return str(save(files[0], tmp / "model_optim_rng.pt"))
    if kind == "dir":
        return str(write_tree(tmp / "ckpt", files))
    return str(write_zip(tmp / "megatron_lm_345m_v0.0.zip", files))


def load_hf(state: dict[str, torch.Tensor], config: dict, out: Path):
    """Save as an HF repo and load it the way users do, catching every warning it logs."""
    from transformers import GPT2LMHeadModel

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded, info = GPT2LMHeadModel.from_pretrained(str(out), output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [str(w.message) for w in caught]
    assert messages == [], messages  # e.g. GPT2LMHeadModel's LOAD REPORT of MISSING/UNEXPECTED keys
    assert not any(info.values()), info  # missing / unexpected / mismatched keys, error messages
    return loaded.eval()


@pytest.mark.parametrize("version", [0, 1.0, 3.0])
@pytest.mark.parametrize("kind,tp", [("pt", 1), ("dir", 1), ("zip", 1), ("dir", 2), ("zip", 2)])
def test_round_trip_logits_exact(tmp_path, model, version, kind, tp):
    url = write(kind, tmp_path, model, version, tp)
    ck = load_megatron(url)
    assert ck.tp_size == tp and ck.checkpoint_version == float(version)
    assert set(ck.ranks[0]) == {"model", "args", "iteration"} | ({"checkpoint_version"} if version else set())
    state, config = convert_megatron(ck, VOCAB)
    ref = model.state_dict()
    assert set(state) == set(ref) - {"lm_head.weight"}  # tied: GPT2LMHeadModel ties it to wte
    for name, t in state.items():
        assert t.is_contiguous() and t.dtype == ref[name].dtype
        assert torch.equal(t, ref[name]), name
    assert config["n_layer"] == 2 and config["tie_word_embeddings"] is True
    assert config["activation_function"] == "gelu_new" and config["torch_dtype"] == "float32"
    loaded = load_hf(state, config, tmp_path / "hf")
    ids = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_bf16_keeps_dtype(tmp_path):
    model = tiny_gpt2(dtype=torch.bfloat16)
    url = write("dir", tmp_path, model, 3.0, 2)
    state, config = convert_megatron(load_megatron(url), VOCAB)
    assert config["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    loaded = load_hf(state, config, tmp_path / "hf")
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_untied_output_layer(tmp_path):
    model = tiny_gpt2(tied=False)
    url = write("zip", tmp_path, model, 3.0, 2)
    state, config = convert_megatron(load_megatron(url), VOCAB)
    assert config["tie_word_embeddings"] is False
    assert torch.equal(state["lm_head.weight"], model.state_dict()["lm_head.weight"])
    loaded = load_hf(state, config, tmp_path / "hf")
    ids = torch.arange(30).view(2, 15)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("flags,expected", [
    ({"bias_gelu_fusion": True, "openai_gelu": True}, "gelu_fast"),
    ({"bias_gelu_fusion": False, "openai_gelu": True}, "gelu_new"),
    ({"bias_gelu_fusion": False, "openai_gelu": False}, "gelu"),
])
def test_activation_from_args(tmp_path, model, flags, expected):
    ck = load_megatron(str(save(payloads(model, 3.0, 1, **flags)[0], tmp_path / "a.pt")))
    assert convert_megatron(ck, VOCAB)[1]["activation_function"] == expected
    assert convert_megatron(ck, {**VOCAB, "activation_function": "relu"})[1]["activation_function"] == "relu"


def test_unsupported_megatron_variants(tmp_path, model):
    ck = load_megatron(str(save(payloads(model, 3.0, 1, swiglu=True)[0], tmp_path / "a.pt")))
    with pytest.raises(MegatronConvertError, match="args.swiglu=True: GPT-2 has no such variant"):
        convert_megatron(ck, VOCAB)


@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_qkv_reorder_matches_reference_converter(version):
    """The reference converter's fix_query_key_value_ordering, as its views and transposes."""
    heads, hd, hidden = 4, 8, 32
    for param in (torch.randn(3 * heads * hd, hidden), torch.randn(3 * heads * hd)):
        shape = param.size()
        expected = param
        if version == 1.0:
            expected = param.view(heads, hd, 3, *shape[1:]).transpose(0, 2).transpose(1, 2).contiguous()
        elif version >= 2.0:
            expected = param.view(heads, 3, hd, *shape[1:]).transpose(0, 1).contiguous()
        expected = expected.view(*shape)
        ours = qkv_split_major(param, version, heads, hd, "qkv").reshape(shape)
        assert torch.equal(ours, expected)


def test_tracker_picks_iteration(tmp_path, model):
    root = tmp_path / "ckpt"
    write_tree(root, payloads(model, 3.0, 1), tracker="1500")
    other = tiny_gpt2(seed=7)
    write_tree(root, payloads(other, 3.0, 1), tracker=None)  # a stale release/ beside it
    (root / "latest_checkpointed_iteration.txt").write_text("1500\n")
    state, _ = convert_megatron(load_megatron(str(root)), VOCAB)
    assert torch.equal(state["transformer.wpe.weight"], model.state_dict()["transformer.wpe.weight"])
    (root / "latest_checkpointed_iteration.txt").write_text("99")
    with pytest.raises(MegatronLoadError, match="iter_0000099"):
        load_megatron(str(root))


def test_remote_filesystem(model):
    """memory:// goes through fsspec file objects, as s3:// / gs:// do."""
    fs = fsspec.filesystem("memory")
    files = payloads(model, 3.0, 2)
    for r, p in enumerate(files):
        buf = io.BytesIO()
        torch.save(p, buf)
        fs.pipe(f"/mg/release/mp_rank_{r:02d}/model_optim_rng.pt", buf.getvalue())
    fs.pipe("/mg/latest_checkpointed_iteration.txt", b"release")
    ck = load_megatron("memory://mg")
    assert ck.source_files[1] == "memory://mg/release/mp_rank_01/model_optim_rng.pt"
    state, _ = convert_megatron(ck, VOCAB)
    assert torch.equal(state["transformer.h.1.attn.c_attn.weight"],
                       model.state_dict()["transformer.h.1.attn.c_attn.weight"])


def test_zip_with_top_folder_and_legacy_format(tmp_path, model):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        torch.save(payloads(model, 0, 1)[0], buf, _use_new_zipfile_serialization=False)
        zf.writestr("megatron_345m/release/mp_rank_00/model_optim_rng.pt", buf.getvalue())
        zf.writestr("megatron_345m/latest_checkpointed_iteration.txt", "release")
    ck = load_megatron(str(path))
    assert ck.source_files == [f"zip://megatron_345m/release/mp_rank_00/model_optim_rng.pt::{path}"]
    convert_megatron(ck, VOCAB)


def test_numpy1_pickle_names_and_megatron_enums(tmp_path, model):
    """Files written under numpy 1.x name numpy.core.*; newer Megatron pickles its own enums."""
    fake = {"megatron": types.ModuleType("megatron"), "megatron.core": types.ModuleType("megatron.core"),
            "megatron.core.enums": types.ModuleType("megatron.core.enums")}
    import enum

    class ModelType(enum.Enum):
        encoder_or_decoder = 1
    ModelType.__module__, ModelType.__qualname__ = "megatron.core.enums", "ModelType"
    fake["megatron.core.enums"].ModelType = ModelType  # type: ignore[attr-defined]
    sys.modules.update(fake)
    try:
        p = payloads(model, 3.0, 1, model_type=ModelType.encoder_or_decoder)[0]
        path = save(p, tmp_path / "a.pt", legacy=True)  # legacy format: the pickle is patchable
    finally:
        for name in fake:
            sys.modules.pop(name)
    raw = path.read_bytes()
    assert b"numpy._core.multiarray" in raw
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    ck = load_megatron(str(path))
    assert isinstance(ck.args.model_type, MegatronEnum) and ck.args.model_type.value == 1
    convert_megatron(ck, VOCAB)


class Payload:
    """Unpickling this runs `touch <path>`: what a malicious checkpoint does."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("where", ["pt", "dir", "zip"])
def test_code_payload_is_refused_and_never_runs(tmp_path, model, legacy, where):
    marker = tmp_path / "pwned"
    evil = payloads(model, 3.0, 1)[0]
    evil["args"] = Payload(marker)
    if where == "pt":
        url = str(save(evil, tmp_path / "evil.pt", legacy=legacy))
    elif where == "dir":
        rank0 = tmp_path / "ck" / "release" / "mp_rank_00" / "model_optim_rng.pt"
        url = str(save(evil, rank0, legacy=legacy).parents[2])
    else:
        url = str(write_zip(tmp_path / "evil.zip", [evil]))
    with pytest.raises(UnsafeCheckpointError) as exc:
        load_megatron(url)
    assert "system" in str(exc.value) and ("posix.system" in str(exc.value) or "nt.system" in str(exc.value))
    assert "model_optim_rng.pt" in str(exc.value) or "evil.pt" in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, model, legacy):
    whole = save(payloads(model, 3.0, 1)[0], tmp_path / "whole.pt", legacy=legacy).read_bytes()
    path = tmp_path / "cut.pt"
    for cut in [len(whole) // 2] + [len(whole) * i // 23 for i in range(1, 23)]:
        path.write_bytes(whole[:cut])  # torch fails differently at each cut; every one is reported
        with pytest.raises(MegatronLoadError, match=r"cut\.pt.*(truncated|corrupt)"):
            load_megatron(str(path))


def test_not_megatron_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(MegatronLoadError, match=r"notes\.pt: not a PyTorch checkpoint"):
        load_megatron(str(text))
    plain = save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "plain.pt")
    with pytest.raises(MegatronLoadError, match=r"plain\.pt: not a Megatron-LM checkpoint.*'state_dict'"):
        load_megatron(str(plain))
    junk = tmp_path / "junk.zip"
    with zipfile.ZipFile(junk, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(MegatronLoadError, match=r"junk\.zip: no mp_rank_XX/model_optim_rng\.pt"):
        load_megatron(str(junk))
    with pytest.raises(MegatronLoadError, match="no such file"):
        load_megatron(str(tmp_path / "absent"))


def test_layer_count_mismatch(tmp_path, model):
    ck = load_megatron(write("pt", tmp_path, model, 3.0, 1))
    with pytest.raises(MegatronConvertError, match=r"n_layer=3 \(from --config\).*2 layers"):
        convert_megatron(ck, {**VOCAB, "n_layer": 3})
    ck.args.num_layers = 5
    with pytest.raises(MegatronConvertError, match=r"n_layer=5 \(from args.num_layers\)"):
        convert_megatron(ck, VOCAB)


def test_unknown_keys_listed(tmp_path, model):
    p = payloads(model, 3.0, 1)[0]
    p["model"]["language_model"]["encoder"]["layers.0.self_attention.rotary.inv_freq"] = torch.ones(4)
    p["model"]["pooler"] = {"dense": {"weight": torch.ones(2, 2)}}
    ck = load_megatron(str(save(p, tmp_path / "x.pt")))
    with pytest.raises(MegatronConvertError) as exc:
        convert_megatron(ck, VOCAB)
    assert "model.language_model.encoder.layers.0.self_attention.rotary.inv_freq" in str(exc.value)
    assert "model.pooler.dense.weight" in str(exc.value) and "2 tensor(s)" in str(exc.value)


def test_vocab_size_needs_the_tokenizer(tmp_path, model):
    ck = load_megatron(write("pt", tmp_path, model, 3.0, 1))
    with pytest.raises(MegatronConvertError,
                       match=r"vocab_size=50257 \(from the GPT-2 BPE tokenizer\).*128.*--config FILE"):
        convert_megatron(ck)  # args say GPT2BPETokenizer, whose 50257 rows this tiny model lacks
    ck.args.tokenizer_type = "SentencePieceTokenizer"
    state, config = convert_megatron(ck)  # unknown tokenizer size: keep every padded row
    assert config["vocab_size"] == 128 and state["transformer.wte.weight"].shape == (128, 32)


def test_no_args_uses_345m_defaults_or_config(tmp_path, model):
    p = payloads(model, 0, 1)[0]
    del p["args"]
    ck = load_megatron(str(save(p, tmp_path / "old.pt")))
    with pytest.raises(MegatronConvertError, match=r"n_layer=24 \(from defaults for NVIDIA's 345M"):
        convert_megatron(ck)
    override = {"vocab_size": 100, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4}
    state, config = convert_megatron(ck, override)
    assert config["activation_function"] == "gelu_new"
    name = "transformer.h.0.attn.c_attn.bias"
    assert torch.equal(state[name], model.state_dict()[name])


def test_tensor_parallel_problems(tmp_path, model):
    files = payloads(model, 3.0, 2)
    root = write_tree(tmp_path / "a", files[:1])  # rank 1 missing, args say TP=2
    with pytest.raises(MegatronLoadError, match="tensor_model_parallel_size=2 but 1 rank"):
        load_megatron(str(root))
    files[1]["model"]["language_model"]["encoder"]["layers.1.input_layernorm.weight"] += 1
    ck = load_megatron(str(write_tree(tmp_path / "b", files)))
    with pytest.raises(MegatronConvertError, match="input_layernorm.weight: replicated, yet rank 1 differs"):
        convert_megatron(ck, VOCAB)
    convert_megatron(ck, VOCAB, check_replicated=False)


def test_find_rank_files_rules():
    read = {"latest_checkpointed_iteration.txt": "release"}.__getitem__
    names = ["latest_checkpointed_iteration.txt", "release/mp_rank_01/model_optim_rng.pt",
             "release/mp_rank_00/model_optim_rng.pt"]
    assert find_rank_files(names, read, "x") == sorted(names[1:])
    with pytest.raises(MegatronLoadError, match=r"ranks \[1\] are missing"):
        find_rank_files(["r/mp_rank_00/model_optim_rng.pt", "r/mp_rank_02/model_optim_rng.pt"], read, "x")
    with pytest.raises(MegatronLoadError, match="pipeline-parallel"):
        find_rank_files(["r/mp_rank_00_000/model_optim_rng.pt", "r/mp_rank_00_001/model_optim_rng.pt"],
                        read, "x")
    with pytest.raises(MegatronLoadError, match="several checkpoints"):
        find_rank_files(["iter_0000001/mp_rank_00/model_optim_rng.pt",
                         "iter_0000002/mp_rank_00/model_optim_rng.pt"], read, "x")
    with pytest.raises(MegatronLoadError, match="torch_dist"):
        find_rank_files(["iter_0000001/__0_0.distcp", "iter_0000001/metadata.json"], read, "x")


@pytest.mark.parametrize("kind", ["dir", "zip", "pt"])
def test_s3(tmp_path, model, s3_options, kind):
    """Real S3 protocol (moto on loopback via s3fs): torch reads through range GETs."""
    import s3fs

    local = Path(write(kind, tmp_path, model, 1.0, 2 if kind != "pt" else 1))
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"])
    dest = f"{s3_options['bucket']}/mg/{local.name}"
    fs.put(str(local), dest, recursive=local.is_dir())
    ck = load_megatron(f"s3://{dest}", s3_options["options"])
    assert ck.tp_size == (2 if kind != "pt" else 1)
    assert all(f.startswith(("s3://", "zip://")) for f in ck.source_files)
    state, _ = convert_megatron(ck, VOCAB)
    ref = model.state_dict()
    assert all(torch.equal(t, ref[name]) for name, t in state.items())
