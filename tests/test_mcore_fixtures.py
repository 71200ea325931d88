"""The Megatron-Core fixtures under tests/data/mcore/ are complete: every folder holds what its record
(fixture.json) says, in the layout Megatron-LM writes, and the README lists every fixture.

Cheap on purpose (headers and small pickles only): the readers' tests check the contents."""
from __future__ import annotations

import json
import re
import zipfile

import pytest
import torch
from safetensors import safe_open

from .helpers import MCORE_DATA, mcore_fixture

NAMES = sorted(p.name for p in MCORE_DATA.iterdir() if p.is_dir() and p.name != "__pycache__")
ITER = "iter_0000001"


def test_every_folder_is_a_fixture_and_the_readme_lists_it():
    assert NAMES, "no fixtures under tests/data/mcore"
    assert [n for n in NAMES if not (MCORE_DATA / n / "fixture.json").is_file()] == []
    readme = (MCORE_DATA / "README.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", readme, flags=re.M))
    assert listed == set(NAMES)
    assert "megatron-core 0.16.1" in readme and "generate.py" in readme


def test_fixtures_stay_small():
    total = sum(p.stat().st_size for p in MCORE_DATA.rglob("*") if p.is_file())
    assert total < 10 * 2**20, f"tests/data/mcore holds {total} bytes"


def _mp_rank_names(rec: dict) -> set[str]:
    """Megatron-LM's get_checkpoint_name: _PPP only when PP > 1, _EEE only when EP > 1."""
    return {f"mp_rank_{t:02d}" + (f"_{p:03d}" if rec["pp"] > 1 else "") + (f"_{e:03d}" if rec["ep"] > 1 else "")
            for t in range(rec["tp"]) for p in range(rec["pp"]) for e in range(rec["ep"])}


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_complete(name):
    folder, rec = mcore_fixture(name)
    assert rec["megatron_core"] == "0.16.1"
    assert [f for f in rec["files"] if not (folder / f).is_file()] == []
    assert rec["formats"], name
    if "torch_dist" in rec["formats"]:
        root = folder / "torch_dist"
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
        it = root / ITER
        for f in (".metadata", "common.pt", "metadata.json"):
            assert (it / f).is_file(), f"{name}: torch_dist/{ITER}/{f}"
        assert json.loads((it / "metadata.json").read_text())["sharded_backend"] == "torch_dist"
        assert list(it.glob("__*_*.distcp")), f"{name}: no .distcp files"
    if "legacy" in rec["formats"]:
        root = folder / "legacy"
        assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
        ranks = {p.name for p in (root / ITER).iterdir()}
        assert ranks == _mp_rank_names(rec)
        for r in ranks:
            assert zipfile.is_zipfile(root / ITER / r / "model_optim_rng.pt"), f"{name}: {r}"

    hf = json.loads((folder / "hf_config.json").read_text())
    assert hf["model_type"] == rec["hf_model_type"] and hf["vocab_size"] == rec["true_vocab_size"]
    assert hf["num_hidden_layers"] == rec["num_layers"]

    with safe_open(folder / "reference_state.safetensors", "pt") as f:
        emb = f.get_slice("embedding.word_embeddings.weight")
        assert emb.get_shape() == [rec["padded_vocab_size"], hf["hidden_size"]]
        assert emb.get_dtype() == {"float32": "F32", "bfloat16": "BF16"}[rec["dtype"]]
        assert ("output_layer.weight" in f.keys()) == (not hf["tie_word_embeddings"])

    ref = torch.load(folder / "reference_logits.pt", weights_only=True)
    assert ref["input_ids"].shape == (1, 8) and int(ref["input_ids"].max()) < rec["true_vocab_size"]
    assert ref["logits"].shape == (1, 8, rec["padded_vocab_size"]) and ref["logits"].dtype == torch.float32
    assert torch.isfinite(ref["logits"]).all()


@pytest.mark.parametrize("name", NAMES)
def test_hf_config_is_what_transformers_reads(name):
    """hf_config.json loads as its model_type's config class with the sizes the fixture was built with."""
    from transformers import AutoConfig

    folder, rec = mcore_fixture(name)
    hf = json.loads((folder / "hf_config.json").read_text())
    cfg = AutoConfig.for_model(**hf)
    assert cfg.model_type == rec["hf_model_type"]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (rec["true_vocab_size"], 64, rec["num_layers"])
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert str(cfg.dtype).removeprefix("torch.") == rec["dtype"]
    if "moe" in rec["hf_model_type"] or rec["hf_model_type"] == "mixtral":
        assert (cfg.num_experts_per_tok, getattr(cfg, "num_experts", None) or cfg.num_local_experts) == (2, 4)
