"""The watch flow: which checkpoints under a prefix get converted, and that they really are.

The planner is pure and tested on listings; the flow runs against moto's S3 server, with one
subflow per checkpoint, and its outputs are compared byte for byte with a local conversion. The
later runs of a sequence, whose assertions are the watch's decisions and bytes and not Prefect's
records, run the same watch with no flow run (`watch_without_prefect`, conversions on the engine).
"""
from __future__ import annotations

import json

import pytest

from ckptflow.storage.listing import FileStat
from ckptflow.storage.urls import StorageError
from ckptflow.tasks.planners.watch import find_checkpoints, marker, plan_watch

from .helpers import dequant_reference, s3_tree, tree

RECIPE = {"dequant": True, "mp": None}


def stat(size: int, version: str = "v1", modified: float = 1000.0) -> FileStat:
    return FileStat(size, version, modified)


def listing(**ckpts: dict[str, FileStat]) -> dict[str, FileStat]:
    return {f"{name}/{rel}": s for name, files in ckpts.items() for rel, s in files.items()}


CKPT = {"config.json": stat(10), "model.safetensors.index.json": stat(20),
        "model-00001-of-00002.safetensors": stat(300), "model-00002-of-00002.safetensors": stat(400)}
OUT = {"config.json": stat(11), "model.safetensors.index.json": stat(21), "model-00001-of-00002.safetensors": stat(600)}


def decisions(plan) -> dict[str, tuple[str, str]]:
    return {d.name: (d.action, d.reason) for d in plan.decisions}


def test_checkpoints_are_folders_with_weights_or_an_index():
    found = find_checkpoints({**listing(a=CKPT, b={"config.json": stat(1), "sub/x.safetensors": stat(2)},
                                        c={"model.safetensors": stat(5)}),
                              "loose.safetensors": stat(9)})
    assert list(found) == ["a", "b/sub", "c"]  # b itself holds no weights; loose files belong to none
    assert set(found["a"].files) == set(CKPT)
    assert found["a"].newest == 1000.0


def test_plan_new_up_to_date_and_each_kind_of_stale():
    found = find_checkpoints(listing(a=CKPT, b=CKPT, c=CKPT, d=CKPT, e=CKPT, f=CKPT))
    done = {n: marker(found[n].fingerprint, RECIPE, f"s3://out/{n}", OUT) for n in "bcdef"}
    done["c"]["source_fingerprint"] = find_checkpoints(
        listing(c={**CKPT, "model-00002-of-00002.safetensors": stat(400, "v2")}))["c"].fingerprint
    done["d"]["recipe"] = "another"
    outputs = listing(**{n: dict(OUT) for n in "bcdef"})
    del outputs["e/model-00001-of-00002.safetensors"]
    outputs["f/model-00001-of-00002.safetensors"] = stat(599)
    plan = plan_watch(found, done, outputs, RECIPE, now=5000.0, settle_seconds=60)
    assert decisions(plan) == {
        "a": ("convert", "new"),
        "b": ("up to date", "output matches"),
        "c": ("convert", "source changed"),
        "d": ("convert", "options changed"),
        "e": ("convert", "output missing model-00001-of-00002.safetensors"),
        "f": ("convert", "output changed: model-00001-of-00002.safetensors"),
    }
    assert [d.name for d in plan.to_convert()] == ["a", "c", "d", "e", "f"]


def test_fingerprint_follows_names_sizes_and_versions():
    base = find_checkpoints(listing(a=CKPT))["a"]
    resized = find_checkpoints(listing(a={**CKPT, "config.json": stat(12)}))["a"]
    rewritten = find_checkpoints(listing(a={**CKPT, "config.json": stat(10, version="v2")}))["a"]
    renamed = find_checkpoints(listing(a={**{k: v for k, v in CKPT.items() if k != "config.json"},
                                          "config2.json": stat(10)}))["a"]
    touched = find_checkpoints(listing(a={**CKPT, "config.json": stat(10, modified=2000.0)}))["a"]
    assert len({base.fingerprint, resized.fingerprint, rewritten.fingerprint, renamed.fingerprint}) == 4
    assert touched.fingerprint == base.fingerprint  # a newer mtime alone, same etag: same bytes


def test_nested_checkpoints_are_found_at_any_depth_and_own_their_subfolders():
    found = find_checkpoints(listing(**{"org/m1": CKPT, "org/m2": {**CKPT, "original/x.safetensors": stat(7)},
                                        "solo": {"model.safetensors": stat(5)}}))
    assert list(found) == ["org/m1", "org/m2", "solo"]
    assert "original/x.safetensors" in found["org/m2"].files  # part of org/m2, not a checkpoint of its own
    outputs = listing(**{"org/m1": OUT})
    done = {"org/m1": marker(found["org/m1"].fingerprint, RECIPE, "x", OUT)}
    plan = plan_watch(found, done, outputs, RECIPE, now=5000.0, settle_seconds=60)
    assert decisions(plan) == {"org/m1": ("up to date", "output matches"), "org/m2": ("convert", "new"),
                               "solo": ("convert", "new")}


def test_a_store_without_modification_times_says_it_cannot_settle():
    found = find_checkpoints(listing(a={"model.safetensors": FileStat(5, "e1", None)}))
    (d,) = plan_watch(found, {}, {}, RECIPE, now=5000.0, settle_seconds=60).decisions
    assert d.action == "convert" and "gives no modification times" in d.reason


def test_a_checkpoint_still_uploading_waits_for_the_next_run():
    found = find_checkpoints(listing(a={**CKPT, "model-00002-of-00002.safetensors": stat(400, modified=4990.0)}))
    plan = plan_watch(found, {}, {}, RECIPE, now=5000.0, settle_seconds=60)
    assert decisions(plan)["a"][0] == "settling" and "10s ago" in decisions(plan)["a"][1]
    assert not plan.to_convert()
    assert plan_watch(found, {}, {}, RECIPE, now=5051.0, settle_seconds=60).to_convert()


# ------------------------------------------------------------------------- the flow, over S3


@pytest.fixture(scope="module")
def watched_ckpt(tmp_path_factory):
    """The demo FP8 layout (six shards, DeepSeek-V3 names) with 2 routed experts, not 8, and its
    clean `--dequant` conversion. Every conversion over S3 reads each tensor with a GET of its own:
    ~110 a checkpoint here, not ~250, and what a watch run decides does not depend on how many."""
    from ckptflow.flows.demo.synthetic import DeepSeekDims, make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    base = tmp_path_factory.mktemp("watched")
    make_deepseek_v3_fp8(open_location(str(base / "fp8")), DeepSeekDims(n_routed_experts=2))
    dequant_reference(base / "fp8", base / "reference", base / "ref-work")
    return {"src": base / "fp8", "expected": tree(base / "reference")}


def put_checkpoint(fs, src, prefix: str) -> None:
    fs.put(str(src) + "/", prefix + "/", recursive=True)


def bucket(s3_options, watched_ckpt) -> dict:
    import s3fs

    return {"fs": s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"]),
            "bucket": s3_options["bucket"], "options": s3_options["options"], **watched_ckpt}


@pytest.fixture
def bucket_with_checkpoints(s3_options, watched_ckpt):
    """incoming/{alpha,beta}: the checkpoint twice; incoming/notes: not a checkpoint."""
    w = bucket(s3_options, watched_ckpt)
    for name in ("alpha", "beta"):
        put_checkpoint(w["fs"], w["src"], f"{w['bucket']}/incoming/{name}")
    w["fs"].pipe(f"{w['bucket']}/incoming/notes/README.md", b"not a checkpoint")
    return w


def by_name(summary) -> dict[str, tuple[str, str]]:
    return {c["name"]: (c["action"], c["reason"]) for c in summary["checkpoints"]}


def watch_run(w) -> dict:
    """The arguments of every watch run of these tests, on `w`'s bucket."""
    b = w["bucket"]
    return dict(source_prefix=f"s3://{b}/incoming", dest_prefix=f"s3://{b}/converted", settle_seconds=0,
                storage_options=w["options"], options={"dequant": True})


def watch_engine(**run) -> dict:
    """A watch run with no flow run: the flow's listings, decisions, markers and summary
    (`watch_once`, shared with `watch_flow`), each conversion on the engine. Where Prefect itself is
    not what is asserted (a subflow run per checkpoint, the flow run's state), the tests run this:
    seconds of Prefect client and server work fewer per run."""
    from ckptflow.flows.watch import watch_without_prefect

    from .helpers import engine_convert

    def convert(source: str, dest: str, work: str, options: dict, storage_options: dict | None) -> dict:
        return engine_convert(source, dest, work, storage_options, **options)

    return watch_without_prefect(convert=convert, **run)


@pytest.mark.slow
def test_watch_converts_missing_and_stale_checkpoints_one_subflow_each(prefect_harness, bucket_with_checkpoints):
    from ckptflow.flows.watch import watch_flow

    w = bucket_with_checkpoints
    fs, b, expected = w["fs"], w["bucket"], w["expected"]
    run = watch_run(w)

    state = watch_flow(**run, return_state=True)  # the real flow run: a subflow run per checkpoint
    first = state.result()
    assert by_name(first) == {"alpha": ("convert", "new"), "beta": ("convert", "new")}
    for name in ("alpha", "beta"):
        assert s3_tree(fs, f"{b}/converted/{name}") == expected
        assert json.loads(fs.cat_file(f"{b}/converted/.ckptflow-work/{name}/watch.json"))["dest"] \
            == f"s3://{b}/converted/{name}"
    assert not fs.exists(f"{b}/converted/notes")
    subflows = _child_flow_runs(state.state_details.flow_run_id)
    assert sorted(subflows) == ["convert-alpha", "convert-beta"]
    assert all(s == "COMPLETED" for s in subflows.values())

    # Nothing changed: nothing is converted, nothing is rewritten.
    stamps = {p: fs.info(p)["LastModified"] for p in fs.find(f"{b}/converted")}
    second = watch_engine(**run)
    assert by_name(second) == {"alpha": ("up to date", "output matches"), "beta": ("up to date", "output matches")}
    assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{b}/converted")} == stamps

    # beta's source gets a new config (its shards' fingerprints are unchanged: all cache hits);
    # one of alpha's outputs is deleted (that shard alone is recomputed).
    cfg = json.loads(fs.cat_file(f"{b}/incoming/beta/config.json"))
    cfg["note"] = "re-uploaded"
    fs.pipe(f"{b}/incoming/beta/config.json", json.dumps(cfg).encode())
    fs.rm(f"{b}/converted/alpha/model-00002-of-00006.safetensors")
    third = watch_engine(**run)
    assert by_name(third) == {"alpha": ("convert", "output missing model-00002-of-00006.safetensors"),
                              "beta": ("convert", "source changed")}
    results = {c["name"]: c["result"] for c in third["checkpoints"]}
    assert results["alpha"]["cached_shards"] == 5 and results["beta"]["cached_shards"] == 6
    assert s3_tree(fs, f"{b}/converted/alpha") == expected
    assert json.loads(fs.cat_file(f"{b}/converted/beta/config.json"))["note"] == "re-uploaded"


@pytest.mark.slow
def test_a_broken_checkpoint_fails_the_watch_run_alone_then_fixed_and_relaid_outputs_are_pruned(
        prefect_harness, s3_options, watched_ckpt):
    """Its own bucket (so it runs beside the test above): gamma broken, delta fine, under one prefix."""
    from ckptflow.flows.watch import WatchFailed, watch_flow

    w = bucket(s3_options, watched_ckpt)
    fs, b, expected = w["fs"], w["bucket"], w["expected"]
    run = watch_run(w)

    # A broken checkpoint fails the watch (flow) run, naming it; the others are still converted.
    put_checkpoint(fs, w["src"], f"{b}/incoming/gamma")
    fs.pipe(f"{b}/incoming/gamma/model-00003-of-00006.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    put_checkpoint(fs, w["src"], f"{b}/incoming/delta")
    state = watch_flow(**run, return_state=True)
    assert state.is_failed()
    failed = r"1 of 2 conversion\(s\) failed:\n  - gamma: .*\n      - model-00003-of-00006.safetensors: header"
    with pytest.raises(WatchFailed, match=failed):
        state.result()
    assert s3_tree(fs, f"{b}/converted/delta") == expected
    assert not fs.exists(f"{b}/converted/gamma/model.safetensors.index.json")
    assert not fs.exists(f"{b}/converted/.ckptflow-work/gamma/watch.json")

    # gamma is fixed: the next run converts it (and only it); then new options change every
    # output's layout, and the old layout's shards are pruned rather than left to clash.
    fs.put(str(w["src"] / "model-00003-of-00006.safetensors"), f"{b}/incoming/gamma/model-00003-of-00006.safetensors")
    fixed = watch_engine(**run)
    assert {n: a for n, (a, _) in by_name(fixed).items()} == {"delta": "up to date", "gamma": "convert"}
    assert s3_tree(fs, f"{b}/converted/gamma") == expected
    relaid = watch_engine(**{**run, "options": {"dequant": True, "reindex": True, "max_shard_size": "400KB"}})
    assert {a for a, _ in by_name(relaid).values()} == {"convert"}
    for name in ("delta", "gamma"):
        names = sorted(p.rsplit("/", 1)[1] for p in fs.find(f"{b}/converted/{name}") if p.endswith(".safetensors"))
        assert names and all("-of-00006" not in n for n in names), names


def test_a_watch_run_without_prefect_fails_as_the_flow_does(s3_options):
    """`watch_without_prefect` raises the flow's `WatchFailed`, with the run's summary."""
    import s3fs

    from ckptflow.flows.watch import WatchFailed

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options["options"])
    b = s3_options["bucket"]
    fs.pipe(f"{b}/incoming/gamma/model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(WatchFailed, match=r"1 of 1 conversion\(s\) failed:\n  - gamma: ") as err:
        watch_engine(**watch_run({"bucket": b, "options": s3_options["options"]}))
    assert by_name(err.value.summary) == {"gamma": ("convert", "new")}
    assert "error" in err.value.summary["checkpoints"][0]["result"]


@pytest.mark.slow
def test_watch_dry_run_converts_nothing_and_options_are_typed(prefect_harness, bucket_with_checkpoints):
    from prefect.exceptions import ParameterTypeError

    from ckptflow.flows.watch import watch_flow

    w = bucket_with_checkpoints
    b = w["bucket"]
    summary = watch_flow(f"s3://{b}/incoming", f"s3://{b}/converted", settle_seconds=0, dry_run=True,
                         storage_options=w["options"])
    assert by_name(summary) == {"alpha": ("convert", "new"), "beta": ("convert", "new")}
    assert not w["fs"].exists(f"{b}/converted")
    with pytest.raises(StorageError, match="incomng: no such folder or prefix"):
        watch_flow(f"s3://{b}/incomng", f"s3://{b}/converted", storage_options=w["options"])
    ok = watch_flow.validate_parameters({"source_prefix": "s3://a", "dest_prefix": "s3://b",
                                         "options": {"mp": "4", "dequant": False}})
    assert ok["options"].mp == 4 and ok["options"].dequant is False
    for bad, field in [({"mp": 0}, "options.mp"), ({"max_shard_size": "big"}, "options.max_shard_size"),
                       ({"dequantize": True}, "options.dequantize")]:
        with pytest.raises(ParameterTypeError, match=field):
            watch_flow.validate_parameters({"source_prefix": "s3://a", "dest_prefix": "s3://b", "options": bad})
    with pytest.raises(ParameterTypeError, match="max_concurrent"):
        watch_flow.validate_parameters({"source_prefix": "s3://a", "dest_prefix": "s3://b", "max_concurrent": 0})


def _child_flow_runs(parent_flow_run_id) -> dict[str, str]:
    """name → state type of every flow run started from a task of the given flow run."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_flow_run_id])))
            return {r.name: r.state_type.value for r in runs}

    return asyncio.run(read())


@pytest.mark.slow
def test_watch_quantize_converts_a_checkpoint_dropped_under_the_prefix(prefect_harness, tmp_path):
    """`ckptflow watch --quantize nvfp4` (the flag, through run_main): a BF16 checkpoint dropped
    under the watched prefix is quantized, byte for byte as the engine quantizes it, once."""

    from .helpers import engine_convert, run_main
    from .test_quantize_stage import save_llama

    incoming, converted = tmp_path / "incoming", tmp_path / "converted"
    incoming.mkdir()
    argv = ("watch", str(incoming), str(converted), "--quantize", "nvfp4", "--settle-seconds", "0", "--json")
    run = run_main(*argv)
    assert run.returncode == 0 and json.loads(run.stdout)["checkpoints"] == [], run.stderr
    save_llama(incoming / "tiny", files=2)  # dropped in: q/k/v and gate/up split over two files
    run = run_main(*argv)
    assert run.returncode == 0, run.stderr
    first = json.loads(run.stdout)
    assert by_name(first) == {"tiny": ("convert", "new")}

    reference = tmp_path / "reference"
    engine_convert(incoming / "tiny", reference, tmp_path / "ref-work", quantize="nvfp4")
    want = {n: b for n, b in tree(reference).items() if n.endswith((".safetensors", ".json"))}
    got = tree(converted / "tiny")
    assert {n: got.get(n) for n in want} == want
    qc = json.loads(got["config.json"])["quantization_config"]
    assert qc["format"] == "nvfp4-pack-quantized" and qc["ignore"] == ["lm_head"]
    assert any(n.endswith(".weight_packed") for n in json.loads(got["model.safetensors.index.json"])["weight_map"])

    run = run_main(*argv)  # nothing new: nothing converted again
    assert run.returncode == 0 and by_name(json.loads(run.stdout)) == {"tiny": ("up to date", "output matches")}
