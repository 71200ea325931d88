"""What many test modules share: subprocess environments, file trees, header-only checkpoints.

Test modules import from here, never from each other (conftest.py holds fixtures only)."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ckptflow.storage.checkpoint import Checkpoint, scan_checkpoint
from ckptflow.storage.safetensors_format import DTYPE_SIZES, Header, TensorInfo

from . import prefect_servers

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# Checkpoints saved by megatron-core itself (tests/data/mcore/README.md lists them; generate.py made them).
MCORE_DATA = ROOT / "tests" / "data" / "mcore"


def mcore_fixture(name: str) -> tuple[Path, dict]:
    """A Megatron-Core fixture's folder and its record (layout, formats, dtype: fixture.json)."""
    folder = MCORE_DATA / name
    return folder, json.loads((folder / "fixture.json").read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(*, temporary_server: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: it runs the installed `ckptflow` package (no PYTHONPATH
    to this checkout, which would make its folders importable as top-level `flows`, `tasks`, …).

    Its Prefect server is this test process's own (PREFECT_API_URL, tests/prefect_servers.py), so
    the run starts none (flows/runtime/server.py: a URL in the environment comes first): a server start
    costs seconds a test. `temporary_server=True` leaves the URL out, for the tests about the
    server a CLI run chooses or starts itself; a PREFECT_API_URL in `extra` wins."""
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    if not temporary_server:
        env["PREFECT_API_URL"] = prefect_servers.api_url()
    env.update(extra)
    return env


def run_main(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`ckptflow ARGS` as `main(argv)` in this process: its exit code, stdout and stderr, as a
    subprocess run would give them, without the 3-5 s of CPU a new process spends importing torch
    and Prefect. For tests of what the CLI parses, prints and refuses; signals, servers and what
    only a real process shows (Prefect's console, exit teardown) keep their subprocess tests.

    A flow it runs reaches this process's Prefect server: the caller asks for the `prefect_harness`
    fixture. `env` is set for the call; the environment is restored after it (the CLI sets
    Prefect's logging variables in its own process)."""
    import contextlib
    import io

    from ckptflow.flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([*args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["ckptflow", *args], code, out.getvalue(), err.getvalue())


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """A Prefect server's or a CLI run's environment on PREFECT_HOME `home`, with no server URL
    unless `extra` names one. `home` is seeded with the session's migrated database, so a server
    started on it does not migrate a new one (10-15 s)."""
    env = cli_env(temporary_server=True, PREFECT_HOME=str(prefect_servers.seed_home(Path(home))),
                  PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING")
    for var in ("PREFECT_API_KEY", "PREFECT_PROFILES_PATH"):
        env.pop(var, None)
    env.update(extra)
    return env


def one_error_line(run: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, no traceback, exactly one `error:` line, which holds every needle."""
    out = run.stdout + run.stderr
    assert run.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def seed_prefect_home(home: Path) -> Path:
    """`home` as a PREFECT_HOME holding a copy of the session's migrated Prefect database, for a
    server a test starts there itself (`ckptflow server start`): it then does not migrate one."""
    return prefect_servers.seed_home(Path(home))


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    except ProcessLookupError:
        pass


def start_moto_process(log_path: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """moto's S3 server as a process of its own (one a test can SIGSTOP), on a free loopback port;
    returns once it accepts connections."""
    port = free_port()
    log = open(log_path, "wb")
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()  # the child holds its own descriptor
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                kill_group(proc)
                raise RuntimeError(f"moto server did not start; see {log_path}") from None
            time.sleep(0.2)


def tree(path) -> dict[str, bytes]:
    """Every file under `path` (dot-files and dot-folders apart: locks, journals) and its bytes."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)}


def s3_tree(fs, prefix: str) -> dict[str, bytes]:
    """`tree` for an object store prefix."""
    fs.invalidate_cache()
    return {p[len(prefix) + 1:]: fs.cat_file(p) for p in sorted(fs.find(prefix))
            if not any(part.startswith(".") for part in p[len(prefix) + 1:].split("/"))}


def fake_ckpt(files: dict[str, list[tuple[str, str, tuple[int, ...]]]], config=None) -> Checkpoint:
    """A Checkpoint from names, dtypes and shapes only: planners need no bytes."""
    headers = {}
    for f, entries in files.items():
        tensors, off = {}, 100
        for name, dtype, shape in entries:
            n = DTYPE_SIZES[dtype] * math.prod(shape)
            tensors[name] = TensorInfo(name, dtype, shape, off, off + n)
            off += n
        headers[f] = Header(f, off, 100, tensors)
    weight_map = {t: f for f, h in headers.items() for t in h.tensors}
    return Checkpoint("mem://x", {f: h.file_size for f, h in headers.items()}, headers,
                      index={"metadata": {}, "weight_map": weight_map}, config=config)


def sigkill_when(child: subprocess.Popen, ready: Callable[[], bool], timeout: float = 180,
                 interval: float = 0.02) -> None:
    """SIGKILL `child`'s process group the moment `ready()` holds (polled every `interval` s: longer
    where `ready()` is a request to a server in this process), then reap it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and child.poll() is None:
        if ready():
            os.killpg(child.pid, signal.SIGKILL)
            break
        time.sleep(interval)
    child.wait()


# A real CLI run with a pause before each shard, so a kill lands mid-run (`kill_slow_cli`).
SLOW_CHILD = """
import sys, time
import ckptflow.tasks.run.shard as st
real = st.write_shard
def slow(*a, **k):
    time.sleep(0.8)
    return real(*a, **k)
st.write_shard = slow
from ckptflow.flows.cli import main
sys.exit(main(sys.argv[1:]))
"""


def kill_slow_cli(args: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None,
                  interval: float = 0.02) -> None:
    """`ckptflow ARGS` in a child that pauses before each shard, SIGKILLed the moment `ready()` holds
    (polled every `interval` s)."""
    child = subprocess.Popen([PYTHON, "-c", SLOW_CHILD, *args], cwd=ROOT, env=env or cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    sigkill_when(child, ready, interval=interval)
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]


def cli_json(args: list[str], env: dict[str, str] | None = None) -> dict:
    """`ckptflow ARGS --json` as a real process that must succeed: its summary."""
    run = subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", *args], cwd=ROOT, env=env or cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def dequant_reference(src: Path, dst: Path, work: Path) -> None:
    """A clean `--dequant` conversion of `src` on the engine, no flow run: the bytes that a CLI,
    flow or deployment run must give (the engine's bytes equal the flow's: test_engine.py)."""
    engine_convert(str(src), str(dst), work=str(work), dequant=True)


def make_llama(path: Path, model_type: str = "qwen2") -> dict:
    """Qwen2-style: q/k/v biases, GQA (4 heads, 2 KV heads), untied head, two files; the source
    tensors by name (bf16; the rotary inv_freq the llama preset drops left out)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    h, hd, inter, vocab = 64, 16, 96, 100
    t = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        for proj, rows in (("q_proj", 4 * hd), ("k_proj", 2 * hd), ("v_proj", 2 * hd)):
            t[p + f"self_attn.{proj}.weight"] = torch.randn(rows, h, generator=g)
            t[p + f"self_attn.{proj}.bias"] = torch.randn(rows, generator=g)
        t[p + "self_attn.o_proj.weight"] = torch.randn(h, 4 * hd, generator=g)
        t[p + "mlp.gate_proj.weight"] = torch.randn(inter, h, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.randn(inter, h, generator=g)
        t[p + "mlp.down_proj.weight"] = torch.randn(h, inter, generator=g)
        t[p + "input_layernorm.weight"] = torch.randn(h, generator=g)
        t[p + "post_attention_layernorm.weight"] = torch.randn(h, generator=g)
    t["model.norm.weight"] = torch.randn(h, generator=g)
    t["lm_head.weight"] = torch.randn(vocab, h, generator=g)
    t = {k: v.to(torch.bfloat16) for k, v in t.items()}
    names = sorted(t)
    path.mkdir()
    files = {"model-00001-of-00002.safetensors": {k: t[k] for k in names[:12]},
             "model-00002-of-00002.safetensors": {k: t[k] for k in names[12:]}
             | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}}
    for file, tensors in files.items():
        save_file(tensors, str(path / file))
    index = {"metadata": {"total_size": sum(x.nbytes for ts in files.values() for x in ts.values())},
             "weight_map": {n: file for file, ts in files.items() for n in ts}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
    return t


def llmc_python() -> str:
    """A Python that imports llm-compressor 0.14 (the test extra's): this one, else CKPTFLOW_LLMC_PYTHON;
    without either the test skips, except under CI=true, where it fails."""
    import importlib.util

    import pytest

    if importlib.util.find_spec("llmcompressor") is not None:
        return sys.executable
    python = os.environ.get("CKPTFLOW_LLMC_PYTHON")
    if not python:
        msg = "llm-compressor is not importable and CKPTFLOW_LLMC_PYTHON is not set"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + ": CI must run the reference tests")
        pytest.skip(msg)
    return python


def engine_convert(source: str, dest: str, work: str | None = None, storage_options: dict | None = None, *,
                   fuse: bool = True, keep_intermediates: bool = False, **options) -> dict:
    """`convert_flow(source, dest, work=…, storage_options=…, **options)` on the engine's entry
    point (`ckptflow.flows.conversion.run_convert`): the same conversion and summary, no flow
    run, no Prefect server. For tests whose assertions are about the bytes, the journal and the
    summary; tests about Prefect itself (task runs, states, retries, artifacts) keep the flow.

    `fuse=False` plans the two-pass route through the work location (the reference a fused pass
    must equal); `keep_intermediates` keeps that pass's output for the test to read."""
    from ckptflow.flows.params import ConvertOptions
    from ckptflow.flows.conversion import run_convert

    opts = ConvertOptions(**options)
    plan = None
    if not fuse:
        from ckptflow.flows.preflight import Preflight
        from ckptflow.flows.recipe import plan_passes
        from ckptflow.storage.urls import open_location

        src = open_location(str(source), storage_options)
        ckpt = scan_checkpoint(src)
        passes, _ = plan_passes(ckpt, opts.recipe(), fuse=False)
        plan = Preflight(ckpt, opts.recipe(), passes, [], src.url)
    return run_convert(str(source), str(dest), None if work is None else str(work), storage_options, opts,
                       plan=plan, keep_intermediates=keep_intermediates)
