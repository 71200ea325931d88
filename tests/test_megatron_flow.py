"""The megatron flow end to end: TP=2 zip → HF GPT-2 that transformers loads, sharded, resumable."""
from __future__ import annotations

import json
import logging

import torch

from ckptflow.flows.megatron import megatron_flow

from .helpers import run_main
from .megatron_fixtures import megatron_args, megatron_models, rank_file, tiny_gpt2, write_tree, write_zip


def load_quietly(path):
    from transformers import GPT2LMHeadModel

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    try:
        model, info = GPT2LMHeadModel.from_pretrained(path, output_loading_info=True)
    finally:
        log.removeHandler(handler)
    return model.eval(), info, messages


def test_megatron_zip_tp2_to_sharded_hf_with_tokenizer(prefect_harness, tmp_path):
    model = tiny_gpt2(seed=3)
    args = megatron_args(model, tp=2)
    payloads = [rank_file(m, args, 3.0) for m in megatron_models(model, 3.0, tp=2)]
    src = write_zip(tmp_path / "megatron.zip", payloads)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.json").write_text("{}")
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tmp_path / "cfg.json").write_text(json.dumps({"vocab_size": 100}))
    out = tmp_path / "hf"
    summary = megatron_flow(str(src), str(out), tokenizer=str(tok), config=str(tmp_path / "cfg.json"),
                            max_shard_size="20KB", work=str(tmp_path / "work"))
    assert summary["tp"] == 2 and summary["shards"] > 1
    assert (out / "model.safetensors.index.json").exists() and (out / "vocab.json").exists()
    loaded, info, messages = load_quietly(out)
    assert not any(info.values()) and messages == [], (info, messages)
    ids = torch.tensor([[1, 7, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    again = megatron_flow(str(src), str(out), tokenizer=str(tok), config=str(tmp_path / "cfg.json"),
                          max_shard_size="20KB", work=str(tmp_path / "work"))
    assert again["import_cached"] and again["cached_shards"] == again["shards"]


def test_megatron_cli_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    model = tiny_gpt2(seed=1)
    payload = rank_file(megatron_models(model, 3.0, tp=1)[0], megatron_args(model, tp=1), 3.0)
    payload["evil"] = Payload()
    src = write_tree(tmp_path / "ckpt", [payload])
    run = run_main("megatron", str(src), str(tmp_path / "out"), "--work", str(tmp_path / "w"))
    assert run.returncode == 2, run.stderr[-2000:]
    assert "error:" in run.stderr and "system" in run.stderr and "Traceback" not in run.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
