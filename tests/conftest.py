"""Shared fixtures: generated checkpoints, one Prefect test server per session, a moto S3."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from . import prefect_servers
from .helpers import PYTHON, free_port

# Where the environment says PYTHONDONTWRITEBYTECODE (this machine's does), every process of the suite,
# its three workers and some hundreds of CLI, server and pool children, would compile ckptflow and
# pytest would rewrite all 100-odd test modules from source again, each time (~4 CPU-s a worker). The
# suite writes bytecode, as Python does by default; its workers and children inherit that from here.
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None):
    sys.dont_write_bytecode = False
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# moto and s3fs need credentials to exist; they are never sent anywhere but loopback.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# A developer's own `ckptflow server start` must not serve the tests' CLI runs (flows/runtime/persistent_server.py).
os.environ["CKPTFLOW_SERVER_HOME"] = __import__("tempfile").mkdtemp(prefix="ckptflow-test-server-")
# The session's migrated Prefect database lives here: named now, in the first process that loads this
# file (pytest's controller under xdist), so that every worker inherits the one folder.
_MADE_TEMPLATE_DIR = not os.environ.get(prefect_servers.TEMPLATE_ENV)
prefect_servers.template_dir()


def pytest_configure(config):
    """Under xdist (`pytest -n 3`), the controller starts the session's one Prefect server in the
    background before any worker starts (tests/prefect_servers.py): the workers inherit its URL and
    share it. A run without xdist starts it when a test first needs it.

    The CLI runs of three workers that start temporary servers share the one default database
    (PREFECT_HOME/prefect.db); on a machine where it does not exist yet, they would all create and
    migrate it at once. The controller creates it first, once (~10 s).

    Where tests run (a worker, or the one process without xdist), Triton kernels run on the CPU
    interpreter when there is no GPU: it must be on before `triton.jit` runs, so before any test
    module is collected. xdist's controller runs no test: it skips the torch import (~1.6 CPU-s
    before the shared server and the workers could start)."""
    if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
        if not __import__("torch").cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        return
    prefect_servers.start_shared()
    if os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
        return
    home = os.path.expanduser(os.environ.get("PREFECT_HOME", "~/.prefect"))
    if not os.path.exists(os.path.join(home, "prefect.db")):
        made = subprocess.run([PYTHON, "-m", "prefect", "server", "database", "upgrade", "-y"],
                              capture_output=True, text=True, timeout=600)
        if made.returncode != 0:
            raise pytest.UsageError(f"could not create Prefect's database in {home}:\n{made.stderr[-2000:]}")


_UNGROUPED = pytest.StashKey[bool]()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`, xdist sends a group's tests to one worker by suffixing their node ids
    with `@NAME` in each worker. Where that did not happen (pytest 9.2 ignores what xdist 3.8 sets),
    every group is split over the workers: its tests fail, saying so, rather than let test_deploy's
    deployments or the llm-compressor fixture run on several workers at once.

    First, tests marked `slow` (servers, Dask, deployments, stalls: tens of seconds each) move to the
    front, in their order: under xdist they start at once while the short ones fill in around them,
    instead of the last of them running alone at the end. Every process sorts the same way, as xdist
    requires."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if hasattr(config, "workerinput") and getattr(config.option, "loadgroup", False):  # set by xdist
        for item in items:
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid:
                item.stash[_UNGROUPED] = True


def pytest_runtest_setup(item):
    if item.stash.get(_UNGROUPED, False):
        pytest.fail("pytest-xdist did not keep this test's xdist_group on one worker: this pytest and "
                    "pytest-xdist pair cannot run `--dist loadgroup`; install the versions pyproject.toml "
                    "names", pytrace=False)


def pytest_terminal_summary(terminalreporter):
    """The shared server's CPU, where it ran (the controller under xdist): what the suite spends on it."""
    cpu = prefect_servers.cpu_seconds()
    if cpu is not None:
        terminalreporter.write_line(f"shared Prefect test server: {cpu:.1f} CPU-s")


def pytest_unconfigure(config):
    prefect_servers.stop()
    if _MADE_TEMPLATE_DIR:
        __import__("shutil").rmtree(prefect_servers.template_dir(), ignore_errors=True)


@pytest.fixture(scope="session")
def prefect_harness():
    """In-process flows run against the session's shared Prefect server, the one its CLI runs use
    (tests/prefect_servers.py), as Prefect's `prefect_test_harness` would run them against a
    server of their own: no server start per worker."""
    with prefect_servers.clients_on(prefect_servers.api_url()):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto's threaded server), as s3fs's own tests use."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_options(s3_endpoint):
    """Storage options for s3fs pointing at the moto endpoint, with a fresh bucket per test."""
    import uuid

    import s3fs

    opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    fs = s3fs.S3FileSystem(**opts)
    bucket = "ckpt-" + uuid.uuid4().hex[:10]
    fs.mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return {"options": opts, "bucket": bucket}


@pytest.fixture
def demo_ckpt(tmp_path):
    """A small DeepSeek-V3-layout FP8 checkpoint on local disk."""
    from ckptflow.flows.demo.synthetic import make_deepseek_v3_fp8
    from ckptflow.storage.urls import open_location

    path = tmp_path / "fp8"
    make_deepseek_v3_fp8(open_location(str(path)))
    return path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The session's shared Prefect server, for the tests whose other processes (workers, Dask, process
    pools, deployments) must reach one server, and a PREFECT_HOME of this worker's for their clients.
    It is a full server (the deployments' scheduler runs), shared with every other test: a test
    finds its own runs by their ids, names or parameters, never by counting everything."""
    return {"url": prefect_servers.api_url(), "home": tmp_path_factory.mktemp("prefect-home")}
