"""Where a run keeps its journal and records by default, and work locations workers cannot reach."""
from __future__ import annotations


import pytest

from ckptflow.flows.workdir import check_work_reachable, default_work
from ckptflow.storage.urls import StorageError, open_location

from .helpers import run_main


@pytest.mark.parametrize("dest, work", [
    ("s3://models/converted/DeepSeek-V3-bf16", "s3://models/converted/.ckptflow-work/DeepSeek-V3-bf16"),
    ("s3://models/converted/x/", "s3://models/converted/.ckptflow-work/x"),
    ("gs://b/out", "gs://b/.ckptflow-work/out"),
])
def test_a_bucket_dest_keeps_its_work_on_the_same_store(dest, work):
    assert default_work(dest) == work


def test_a_local_dest_keeps_its_work_in_this_machines_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTFLOW_WORK", str(tmp_path / "cache"))
    a, b = default_work(str(tmp_path / "a")), default_work(str(tmp_path / "b"))
    assert a.startswith(str(tmp_path / "cache")) and a != b
    assert default_work(str(tmp_path / "a") + "/") == a


def test_a_local_work_location_is_refused_for_a_remote_dask_cluster(tmp_path):
    with pytest.raises(StorageError, match=r"--work .* other machines"):
        check_work_reachable(open_location(str(tmp_path)), "tcp://scheduler:8786")
    check_work_reachable(open_location(str(tmp_path)), None)  # threads, processes, a LocalCluster


def test_the_cli_refuses_it_before_prefect_starts(demo_ckpt, tmp_path):
    proc = run_main("convert", str(demo_ckpt), str(tmp_path / "out"), "--dequant", "--task-runner", "dask",
                    "--dask-address", "tcp://127.0.0.1:9", "--work", str(tmp_path / "work"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--work" in errors[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
