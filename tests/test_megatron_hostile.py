"""Hostile Megatron-LM inputs: small files that ask the loader for gigabytes end in one `error:`
line, in bounded memory, with SOURCE untouched and nothing published in DEST."""
from __future__ import annotations

import hashlib
import os
import re
import zipfile
from pathlib import Path

import pytest
import torch

from ckptflow.flows.megatron import megatron_preflight
from ckptflow.storage.errors import UserError
from ckptflow.tasks.megatron.load import MegatronLoadError, inspect_megatron, load_megatron
from ckptflow.tasks.megatron.mapping import MegatronConvertError, convert_megatron, flatten

from .helpers import PYTHON, ROOT, cli_env
from .megatron_fixtures import (clean_ranks, forged_torch_file, hostile_sources, megatron_args, megatron_models,
                                rank_file, run_cli_measured, save, tiny_gpt2, tracker_tree, write_tree,
                                write_zip)

GIB = 1 << 30
VOCAB = {"vocab_size": 100}
BOMBS = hostile_sources()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt2()


def clean(model, tp: int = 1) -> list[dict]:
    return clean_ranks(model, tp)


def digest(path: Path) -> dict[str, str]:
    """Each file's bytes, hashed with where its holes are: a sparse 1.5 GB tracker hashes its data
    only (not 1.5 GB of zeros, twice a test), and any write changes the digest (it changes the
    bytes of a data extent, or turns part of a hole into data)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    out = {}
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            fd, size, pos = fh.fileno(), os.fstat(fh.fileno()).st_size, 0
            while pos < size:
                try:
                    start = os.lseek(fd, pos, os.SEEK_DATA)
                except OSError:  # ENXIO: nothing but a hole from pos to the end
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                h.update(f"{start}-{end}:".encode())
                fh.seek(start)
                while start < end and (chunk := fh.read(min(1 << 24, end - start))):
                    h.update(chunk)
                    start += len(chunk)
                pos = end
            h.update(f"size {size}".encode())
        out[str(f.relative_to(path.parent))] = h.hexdigest()
    return out


@pytest.mark.parametrize("case", list(BOMBS))
def test_loader_and_preflight_refuse(tmp_path, model, case):
    build, message = BOMBS[case]
    src = str(build(tmp_path, model))
    with pytest.raises(MegatronLoadError, match=message):
        load_megatron(src)
    with pytest.raises(MegatronLoadError, match=message):
        megatron_preflight(src)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BOMBS))
def test_cli_refuses_in_bounded_memory(tmp_path, model, case):
    build, message = BOMBS[case]
    (tmp_path / "src").mkdir()
    src = build(tmp_path / "src", model)
    before = digest(src)
    dest, work = tmp_path / "out", tmp_path / "work"
    # refused before Prefect is imported: no server to name (a run that got further would start its own)
    run, peak, seconds = run_cli_measured(["megatron", str(src), str(dest), "--work", str(work)], PYTHON, ROOT,
                                          cli_env(temporary_server=True), tmp_path / "rss")
    errors = [ln for ln in run.stderr.splitlines() if ln.startswith("error:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(errors) == 1 and re.search(message, errors[0]), run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    assert digest(src) == before
    assert not dest.exists() or not any(dest.iterdir())  # refused before DEST was locked or written
    assert not (work / "stages" / "megatron" / "model.safetensors").exists()
    assert peak <= GIB, f"{case}: peak RSS {peak / 2**20:.0f} MiB in {seconds:.1f} s"


def test_shapes_are_checked_against_the_config_before_any_copy(tmp_path, model):
    p = clean(model)[0]
    enc = p["model"]["language_model"]["encoder"]
    enc["final_layernorm.weight"] = torch.ones(64)  # honest storage, but n_embd is 32
    src = str(save(p, tmp_path / "a.pt"))
    want = r"model\.language_model\.encoder\.final_layernorm\.weight \(rank 0\) has shape \[64\], expected \[32\]"
    with pytest.raises(MegatronConvertError, match=want + r" \(\[n_embd\] with n_embd=32\)"):
        convert_megatron(load_megatron(src), VOCAB)
    (tmp_path / "cfg.json").write_text('{"vocab_size": 100}')
    with pytest.raises(MegatronConvertError, match=want):
        megatron_preflight(src, config=str(tmp_path / "cfg.json"))

    ranks = clean(model, tp=2)  # a column-parallel MLP weight cut the wrong way on rank 1
    ranks[1]["model"]["language_model"]["encoder"]["layers.1.mlp.dense_h_to_4h.weight"] = torch.ones(64, 16)
    with pytest.raises(MegatronConvertError, match=r"layers\.1\.mlp\.dense_h_to_4h\.weight \(rank 1\) has shape "
                                                   r"\[64, 16\], expected \[64, 32\] \(\[n_inner/2, n_embd\]"):
        convert_megatron(load_megatron(str(write_tree(tmp_path / "tp2", ranks))), VOCAB)

    p = clean(model)[0]  # a 1-D embedding: refused by rank, not an IndexError in the config code
    p["model"]["language_model"]["embedding"]["word_embeddings"]["weight"] = torch.ones(128)
    with pytest.raises(MegatronConvertError, match=r"word_embeddings\.weight \(rank 0\) is a float32 tensor of "
                                                   r"shape \[128\]; transformer\.wte\.weight is a 2-D float"):
        megatron_preflight(str(save(p, tmp_path / "b.pt")))


def test_overlapping_views_refused_but_real_views_load(tmp_path, model):
    p = clean(model)[0]
    p["optimizer"]["state"][0]["exp_avg"] = torch.arange(2000.0).as_strided((1000, 1000), (1, 1))
    with pytest.raises(MegatronLoadError, match=r"tensor optimizer\.state\.0\.exp_avg has shape \[1000, 1000\] "
                                                r"and strides \[1, 1\] over a storage of 2000 element"):
        load_megatron(str(save(p, tmp_path / "overlap.pt", legacy=True)))

    p = clean(model)[0]  # a slice of a bigger storage and a transposed-in-memory weight are fine
    enc = p["model"]["language_model"]["encoder"]
    ln, dense = enc["final_layernorm.weight"], enc["layers.0.mlp.dense_h_to_4h.weight"]
    enc["final_layernorm.weight"] = torch.cat([ln, torch.zeros(100)])[:32]
    enc["layers.0.mlp.dense_h_to_4h.weight"] = dense.t().contiguous().t()
    for legacy in (False, True):
        state, _ = convert_megatron(load_megatron(str(save(p, tmp_path / f"views{legacy}.pt", legacy))), VOCAB)
        assert torch.equal(state["transformer.ln_f.weight"], ln)
        assert torch.equal(state["transformer.h.0.mlp.c_fc.weight"], dense.t())


def test_storage_claims_checked_against_the_bytes_held(tmp_path, model):
    whole = save(clean(model)[0], tmp_path / "legacy.pt", legacy=True).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[:-100])  # the pickle is whole; the last storage lacks 100 bytes
    with pytest.raises(MegatronLoadError, match=r"cut\.pt: its tensors claim \S+ \S+ of storage but only"):
        load_megatron(str(cut))

    zipped = save(clean(model)[0], tmp_path / "z.pt")
    with zipfile.ZipFile(zipped) as src, zipfile.ZipFile(tmp_path / "short.pt", "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-4] if info.filename.endswith("data/3") else data)
    with pytest.raises(MegatronLoadError, match=r"short\.pt: storage 3 claims \d+ bytes but the file holds"):
        load_megatron(str(tmp_path / "short.pt"))
    with zipfile.ZipFile(zipped) as src, zipfile.ZipFile(tmp_path / "deflated.pt", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(MegatronLoadError, match=r"deflated\.pt: record \S+ is compressed"):
        load_megatron(str(tmp_path / "deflated.pt"))


def test_pickle_size_and_nesting_are_bounded(tmp_path, model):
    p = clean(model)[0]
    p["args"].notes = "x" * (17 << 20)  # a 17 MiB string: the pickle itself outgrows its cap
    for legacy in (False, True):
        with pytest.raises(MegatronLoadError, match=r"its pickle is (\S+ MB, )?larger than 16\.8 MB"):
            load_megatron(str(save(p, tmp_path / f"big{legacy}.pt", legacy)))
    p = clean(model)[0]
    deep: dict = {"w": torch.ones(1)}
    for _ in range(40):
        deep = {"d": deep}
    p["model"]["language_model"]["extra"] = deep
    with pytest.raises(MegatronConvertError, match="nested more than 16 dicts deep"):
        megatron_preflight(str(save(p, tmp_path / "deep.pt")))


def test_tracker_numbers(tmp_path, model):
    for text in ("1000000000001", "²", "12 13"):
        with pytest.raises(MegatronLoadError, match="expected 'release' or an iteration number"):
            load_megatron(str(tracker_tree(tmp_path / text / "ckpt", model, text=text)))
    with pytest.raises(MegatronLoadError, match="iter_1000000000000"):  # the largest accepted: looked up
        load_megatron(str(tracker_tree(tmp_path / "max", model, text="1000000000000\n")))


def test_scan_sees_what_torch_loads(tmp_path, model):
    """The bounded scan's meta tree matches torch.load's tree: names, shapes, strides, dtypes, args."""
    for legacy in (False, True):
        for version in (0, 1.0, 3.0):
            ranks = [rank_file(m, megatron_args(model, 2), version or None)
                     for m in megatron_models(model, version, 2)]
            root = tmp_path / f"{legacy}-{version}"
            for r, payload in enumerate(ranks):
                save(payload, root / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt", legacy=legacy)
            real, meta = load_megatron(str(root)), inspect_megatron(str(root))
            assert vars(real.args) == vars(meta.args) and real.checkpoint_version == meta.checkpoint_version
            for a, b in zip(real.ranks, meta.ranks):
                fa, fb = flatten(a["model"]), flatten(b["model"])
                assert list(fa) == list(fb)
                assert all(b.is_meta and (a.shape, a.stride(), a.dtype) == (b.shape, b.stride(), b.dtype)
                           for a, b in zip(fa.values(), fb.values()))
    zpath = write_zip(tmp_path / "m.zip", clean(model, 2))
    with pytest.raises(UserError, match="vocab_size=50257"):  # the preflight runs the config checks too
        megatron_preflight(str(zpath))
    (tmp_path / "cfg.json").write_text('{"vocab_size": 100}')
    assert megatron_preflight(str(zpath), config=str(tmp_path / "cfg.json"))["n_embd"] == 32


def _str(s: str) -> bytes:  # BINUNICODE
    return b"X" + len(s.encode()).to_bytes(4, "little") + s.encode()


_HEAD = b"\x80\x02}(" + _str("model") + b"}" + _str("x") + b"]("  # {'model': {}, 'x': [ ...
_TAIL = b"eu."                                                    # ... ]}


def test_memo_references_cannot_multiply_work(tmp_path):
    """Pickle memo references cost 2 bytes: 1 MB of string re-encoded 3000 times would be 3 GB."""
    encode = b"c_codecs\nencode\nq\x01" + _str("x" * 1_000_000) + b"q\x02" + _str("latin1") + b"q\x03\x86R"
    copies = encode + b"h\x01h\x02h\x03\x86R" * 3000
    src = forged_torch_file(tmp_path / "copies.pt", _HEAD + copies + _TAIL)
    with pytest.raises(MegatronLoadError, match=r"copies\.pt: refused: its pickle copies the same values over"):
        load_megatron(str(src))

    rebuild = (b"ctorch._utils\n_rebuild_tensor_v2\nq\x01((" + _str("storage") + b"ctorch\nFloatStorage\n"
               + _str("0") + _str("cpu") + b"K\x01tQq\x02K\x00K\x01\x85q\x03K\x01\x85q\x04\x89NtR")
    tensors = rebuild + b"h\x01(h\x02K\x00h\x03h\x04\x89NtR" * (1 << 17)  # 131073 views of 1 float
    src = forged_torch_file(tmp_path / "many.pt", _HEAD + tensors + _TAIL, {"data/0": bytes(4)})
    with pytest.raises(MegatronLoadError, match=r"many\.pt: refused: its pickle rebuilds more than 131072 tensors"):
        load_megatron(str(src))
    ok = forged_torch_file(tmp_path / "few.pt", _HEAD + rebuild + b"h\x01(h\x02K\x00h\x03h\x04\x89NtR" + _TAIL,
                           {"data/0": bytes(4)})
    assert len(inspect_megatron(str(ok)).ranks) == 1  # the same pickle, two tensors: loads


def test_gpu_era_storage_names_still_load(tmp_path):
    """Files saved from GPUs by older torch name torch.cuda.HalfStorage; the scan accepts what torch does."""
    half = tiny_gpt2(dtype=torch.float16)
    path = save(rank_file(megatron_models(half, 3.0, 1)[0], megatron_args(half, 1), 3.0), tmp_path / "gpu.pt",
                legacy=True)
    raw = path.read_bytes()
    assert raw.count(b"ctorch\nHalfStorage") == 1
    path.write_bytes(raw.replace(b"ctorch\nHalfStorage", b"ctorch.cuda\nHalfStorage"))
    state, config = convert_megatron(load_megatron(str(path)), VOCAB)
    assert config["torch_dtype"] == "float16" and torch.equal(state["transformer.wpe.weight"],
                                                               half.state_dict()["transformer.wpe.weight"])
    assert inspect_megatron(str(path)).ranks[0]["model"]["language_model"]["embedding"]["word_embeddings"][
        "weight"].dtype == torch.float16


@pytest.mark.parametrize("legacy", [False, True])
def test_damaged_bytes_give_one_clean_error(tmp_path, model, legacy):
    """Random byte flips (mostly in the pickle and zip headers): a UserError or a checkpoint, never
    another exception (a traceback at the CLI)."""
    import random

    rng = random.Random(7)
    whole = save(clean(model)[0], tmp_path / "whole.pt", legacy=legacy).read_bytes()
    bad = tmp_path / "bad.pt"
    outcomes = set()
    for _ in range(120):
        data = bytearray(whole)
        for _ in range(rng.choice([1, 2, 8])):
            data[rng.randrange(len(data)) if rng.random() < 0.3 else rng.randrange(6000)] = rng.randrange(256)
        bad.write_bytes(bytes(data))
        try:
            convert_megatron(inspect_megatron(str(bad)), VOCAB, check_replicated=False)
            convert_megatron(load_megatron(str(bad)), VOCAB, check_replicated=False)
            outcomes.add("ok")
        except UserError as exc:
            outcomes.add(type(exc).__name__)
    assert "MegatronLoadError" in outcomes and "ok" in outcomes  # both kinds happened


def test_zip_of_an_unknown_version_is_a_clean_error(tmp_path, model):
    raw = bytearray(save(clean(model)[0], tmp_path / "v.pt").read_bytes())
    central = raw.find(b"PK\x01\x02")
    raw[central + 6] = 74  # "version needed to extract": 7.4, which zipfile does not implement
    (tmp_path / "v74.pt").write_bytes(bytes(raw))
    with pytest.raises(MegatronLoadError, match=r"v74\.pt: a zip .* cannot be read \(zip file version 7\.4\)"):
        load_megatron(str(tmp_path / "v74.pt"))
