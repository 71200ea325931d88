"""A shard task's user-facing error names the worker process it failed on (tasks/run/worker_errors.py).

The Dask end-to-end case (a worker without credentials) is in test_dask_cluster.py; these check
the rewording itself, that it survives the pickle back to the flow, that retries still see a
transient cause, and that a task in the flow's own process is left alone."""
from __future__ import annotations

import pickle

import pytest
from prefect import flow, task

from ckptflow.storage.errors import UserError
from ckptflow.storage.lock import LockLost
from ckptflow.storage.safetensors_format import HeaderError
from ckptflow.storage.transient import is_transient
from ckptflow.storage.urls import StorageError
from ckptflow.tasks.run import worker_errors
from ckptflow.tasks.run.worker_errors import names_the_worker, on_worker


def test_a_user_error_names_the_worker_on_its_first_line_and_keeps_its_class():
    named = on_worker(LockLost("DEST s3://b/out: lock lost\n  - detail"), "host-7:4242")
    assert type(named) is LockLost
    assert str(named) == "on worker host-7:4242: DEST s3://b/out: lock lost\n  - detail"
    assert str(pickle.loads(pickle.dumps(named))) == str(named)


def test_an_error_whose_class_cannot_be_rebuilt_from_its_message_still_travels():
    original = HeaderError("model-00001.safetensors", "header length 9e18 exceeds the file")
    with pytest.raises(TypeError):  # plain pickle rebuilds an exception as cls(*args)
        HeaderError(*original.args)
    named = on_worker(original, "h:1")
    back = pickle.loads(pickle.dumps(named))
    assert isinstance(back, UserError)
    assert str(back) == "on worker h:1: model-00001.safetensors: header length 9e18 exceeds the file"


def test_environment_failures_are_explained_and_bugs_left_alone():
    from botocore.exceptions import NoCredentialsError

    named = on_worker(NoCredentialsError(), "h:2")
    assert str(named).startswith("on worker h:2: no storage credentials found; set AWS_ACCESS_KEY_ID")
    assert on_worker(ValueError("index out of range"), "h:2") is None


def test_a_transient_failure_still_reads_as_transient_to_the_retry_condition(monkeypatch):
    from botocore.exceptions import ReadTimeoutError

    @names_the_worker
    def shard() -> None:
        raise ReadTimeoutError(endpoint_url="http://s3.local/b/k")

    monkeypatch.setattr(worker_errors, "away_from_flow", lambda: True)
    with pytest.raises(UserError, match=r"^on worker .+:\d+: http://s3.local/b/k accepted the connection") as info:
        shard()
    assert is_transient(info.value)  # through __cause__: Prefect still retries it


@task
@names_the_worker
def _failing_task() -> None:
    raise StorageError("s3://b/src/model.safetensors: not found")


@flow
def _flow_with_a_failing_task() -> None:
    _failing_task.submit().result()


def test_a_task_in_the_flows_own_process_is_left_alone(prefect_harness):
    with pytest.raises(StorageError) as info:
        _flow_with_a_failing_task()
    assert str(info.value) == "s3://b/src/model.safetensors: not found"
