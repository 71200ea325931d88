"""ckptflow installs one import package, `ckptflow`, from the repository's top-level folders.

flows/, tasks/ and storage/ are installed as `ckptflow.flows`, `ckptflow.tasks`,
`ckptflow.storage` (pyproject's package-dir). Generic top-level names would collide with other
distributions (PyPI has `tasks`, `storage` and `flows`) and with every Prefect project's own
`flows/`. These tests build the wheel, install it beside a distribution that ships those names,
check that the editable install maps the same modules to the same folders, and that no source file
names a module by its bare folder name.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .helpers import PYTHON, ROOT, cli_env

SUBPACKAGES = ("flows", "tasks", "storage")  # each folder is ckptflow.<folder>
SOURCE_DIRS = (*SUBPACKAGES, "tests", "bench")
BARE = re.compile(r"(?<![\w.])(?:from|import) (?:flows|tasks|storage)\b")  # in code held in strings


def package_files() -> set[str]:
    """Paths, as installed under ckptflow/, of the package's modules and data in this checkout."""
    out = set()
    for sub in SUBPACKAGES:
        for p in (ROOT / sub).rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json"):
                out.add("ckptflow/" + p.relative_to(ROOT).as_posix())
    return out


# ------------------------------------------------------------------- fast: the sources themselves


ON_PURPOSE = "# a user's own package, on purpose"  # marks the line of a deliberate bare name


def bare_references(path: Path) -> list[str]:
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text, str(path))
    found = []
    for node in ast.walk(tree):
        if hasattr(node, "lineno") and ON_PURPOSE in lines[node.lineno - 1]:
            continue
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in SUBPACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in SUBPACKAGES:
                found.append(node.module)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "-m flows.cli", monkeypatch targets, resources.files("tasks.presets"), code for -c
            if re.fullmatch(r"(flows|tasks|storage)(\.\w+)+", node.value) or BARE.search(node.value):
                found.append(repr(node.value[:60]))
    return [f"{path.relative_to(ROOT)}:{ref}" for ref in found]


def test_no_source_file_names_a_bare_folder_module():
    """Every import names `ckptflow.…` or is relative: from the repository root (where `python -m`
    puts the folders on sys.path) a bare `tasks.x` would load the same file a second time."""
    refs = [r for d in SOURCE_DIRS for p in sorted((ROOT / d).rglob("*.py")) for r in bare_references(p)]
    assert refs == []


def test_package_data_is_read_through_importlib_resources():
    from importlib import resources

    presets = resources.files("ckptflow.tasks.presets")
    assert sorted(p.name for p in presets.iterdir() if p.name.endswith(".json")) == sorted(
        p.name for p in (ROOT / "tasks" / "presets").glob("*.json"))


def test_editable_install_maps_ckptflow_to_the_folders_and_nothing_else(tmp_path):
    """The editable finder resolves every module the wheel holds to this checkout's file, and
    nothing the wheel lacks (`ckptflow.tests`, top-level `flows`/`tasks`/`storage`)."""
    modules = sorted(f[:-3].replace("/", ".").removesuffix(".__init__")
                     for f in package_files() if f.endswith(".py"))
    code = ("import importlib.util, json, sys\n"
            "mods = json.loads(sys.argv[1])\n"
            "out = {m: importlib.util.find_spec(m).origin for m in mods}\n"
            "absent = ('ckptflow.tests', 'ckptflow.bench', 'flows', 'tasks', 'storage')\n"
            "none = {m: importlib.util.find_spec(m) for m in absent}\n"
            "print(json.dumps({'found': out, 'none': {k: v is None for k, v in none.items()}}))\n")
    # cwd elsewhere: from the repository root `python -m` would put the folders on sys.path.
    run = subprocess.run([PYTHON, "-c", code, json.dumps(modules)], cwd=tmp_path, env=cli_env(temporary_server=True),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for mod, origin in got["found"].items():
        rel = "/".join(mod.split(".")[1:])
        assert Path(origin) in (ROOT / f"{rel}.py", ROOT / rel / "__init__.py"), (mod, origin)
    assert all(got["none"].values()), got["none"]


def test_version_and_verbose_after_the_subcommand():
    from ckptflow.flows.cli.parser import build_parser

    run = subprocess.run([str(Path(PYTHON).parent / "ckptflow"), "--version"], env=cli_env(temporary_server=True),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"ckptflow {importlib.metadata.version('ckptflow')}"
    parse = build_parser().parse_args
    assert parse(["convert", "A", "B", "--dequant", "-v"]).verbose is True
    assert parse(["convert", "A", "B", "--verbose", "--dequant"]).verbose is True
    assert parse(["-v", "convert", "A", "B"]).verbose is True  # not reset by the subcommand's default
    assert parse(["convert", "A", "B"]).verbose is False
    for command in (["validate", "X"], ["verify", "X"], ["watch", "S", "D"], ["megatron", "S", "D"], ["demo"]):
        assert parse([*command, "-v"]).verbose is True, command


def test_verbose_after_the_subcommand_shows_the_traceback(tmp_path):
    def validate(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PYTHON, "-m", "ckptflow.flows.cli", "validate", str(tmp_path / "nope"), *extra],
                              cwd=tmp_path, env=cli_env(temporary_server=True), capture_output=True, text=True,
                              timeout=120)

    quiet, verbose = validate(), validate("-v")
    assert quiet.returncode == 2 and quiet.stderr.startswith("error: ") and "Traceback" not in quiet.stderr
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr and "StorageError" in verbose.stderr


# -------------------------------------------------------------------- slow: build and install


def build_wheel(src: Path, out: Path) -> Path:
    """`pip wheel` of a copy of `src` (an in-place build would reuse a stale build/ folder)."""
    tree = out / "src"
    shutil.copytree(src, tree, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "out", "ckptflow-demo*"))
    run = subprocess.run([PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(tree),
                          "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"))


@pytest.mark.slow
def test_the_wheel_holds_one_top_level_package_ckptflow(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"ckptflow-{importlib.metadata.version('ckptflow')}.dist-info"
    assert {n.split("/")[0] for n in names} == {"ckptflow", dist_info}
    record = zipfile.ZipFile(wheel).read(f"{dist_info}/RECORD").decode()
    assert {line.split(",")[0].split("/")[0] for line in record.splitlines() if line} == {"ckptflow", dist_info}
    top_level = f"{dist_info}/top_level.txt"
    if top_level in names:
        assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["ckptflow"]
    # The same modules and data as the folders the editable install maps: nothing more, nothing less.
    assert {n for n in names if n.startswith("ckptflow/")} == package_files()
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "ckptflow = ckptflow.flows.cli:console_main" in entry_points


def write_wheel(out: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel of `files` (path → text) as a build backend writes one (PEP 427: the
    dist-info's METADATA, WHEEL and a RECORD of sha256 digests), zipped here: the distribution that
    ships top-level `flows`, `tasks` and `storage` needs no build (a setuptools build through pip
    costs ~2 CPU-s and, on a busy machine, over 10 s)."""
    import base64
    import hashlib

    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {**files,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: ckptflow-tests\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
             f"{dist_info}/top_level.txt": "".join(sorted({f"{p.split('/')[0]}\n" for p in files}))}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}\n")
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist_info}/RECORD", "".join(record) + f"{dist_info}/RECORD,,\n")
    return wheel


@pytest.mark.slow
def test_installs_beside_a_distribution_that_ships_flows_tasks_and_storage(wheel, demo_ckpt, tmp_path):
    """A venv holding ckptflow's wheel and a distribution with top-level `flows`, `tasks` and
    `storage` packages: both import, neither overwrites the other, uninstalling one keeps the other."""
    dummy_wheel = write_wheel(tmp_path / "dummy-wheel", "generic-names", "1.0",
                              {f"{pkg}/__init__.py": f"DUMMY = {pkg!r}\n" for pkg in SUBPACKAGES})

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # Dependencies (torch, prefect, …) from the test venv, searched after this venv's own packages;
    # a path line in a .pth runs none of that folder's .pth files, so not its editable ckptflow finder.
    # The test venv's own folder, and any it reaches through a .pth path line (a git worktree's venv
    # that shares another venv's packages) which, named here, would not be followed again.
    deps = dict.fromkeys([sysconfig.get_path("purelib"), *(p for p in sys.path if p.endswith("site-packages"))])
    (site / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))

    def pip(*args: str) -> None:
        run = subprocess.run([PYTHON, "-m", "pip", "--python", str(py), *args, "-q"], capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr

    pip("install", "--no-deps", "--no-index", str(wheel), str(dummy_wheel))
    code = ("import importlib, json, pkgutil, sys, ckptflow, flows, tasks, storage\n"
            "mods = [m.name for m in pkgutil.walk_packages(ckptflow.__path__, 'ckptflow.')]\n"
            "for m in mods: importlib.import_module(m)\n"
            "from importlib import resources\n"
            "print(json.dumps({'mods': mods, 'dummy': [flows.DUMMY, tasks.DUMMY, storage.DUMMY],\n"
            "  'files': {m: sys.modules[m].__file__ for m in mods},\n"
            "  'preset': resources.files('ckptflow.tasks.presets').joinpath('llama.json').is_file()}))\n")
    env = cli_env(temporary_server=True)
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(py), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    assert got["dummy"] == ["flows", "tasks", "storage"]
    assert {"ckptflow.flows.cli", "ckptflow.tasks.kernels.fp8_triton", "ckptflow.storage.urls"} <= set(got["mods"])
    assert all(f.startswith(str(site / "ckptflow")) for f in got["files"].values()), got["files"]
    assert got["preset"]

    cli = venv / "bin" / "ckptflow"
    ok = subprocess.run([str(cli), "validate", str(demo_ckpt)], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=180)
    assert ok.returncode == 0 and ": ok" in ok.stdout, ok.stdout + ok.stderr

    pip("uninstall", "-y", "generic-names")  # removes its own tasks/ and storage/, not ckptflow's
    after = subprocess.run([str(cli), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=60)
    assert after.returncode == 0 and after.stdout.startswith("ckptflow "), after.stderr
    assert (site / "ckptflow" / "tasks" / "__init__.py").is_file() and not (site / "tasks").exists()
