"""A wheel (a non-editable install) carries the CUDA sources as flashmla_ops/csrc/ and the shipped checkpoint, and the
installed package finds them; `python -m flashmla_ops.build` compiles the kernels ahead of first use, or says why it
cannot."""
import fnmatch
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import pytest
import torch
from decode_inputs import HOPPER

from flashmla_ops import _ext, build

ROOT = Path(__file__).resolve().parent.parent.parent
PROJECT_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE")
PROJECT_DIRS = ("csrc", "flashmla_ops", "models")
CHECKPOINT = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
IGNORED = ("__pycache__", "*.o", "*.so", ".*")  # what setup.py leaves out of csrc/
# Build leftovers planted in the copied project's csrc/ (the copy itself leaves out __pycache__ and *.so): none may ship
LEFTOVERS = ("dense_decode.cuda.o", "flashmla_ops_cuda.so", ".dense_decode.cu.swp", "__pycache__/bindings.cpython.pyc")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the project (so that no build/ folder is left in the checkout)."""
    source = tmp_path_factory.mktemp("project")
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, source / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    for name in LEFTOVERS:
        (source / "csrc" / name).parent.mkdir(exist_ok=True)
        (source / "csrc" / name).write_bytes(b"leftover")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True)
    (path,) = out.glob("flashmla_ops-*.whl")
    return path


def test_wheel_carries_the_cuda_sources_and_the_shipped_checkpoint(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        sources = sorted(path for path in (ROOT / "csrc").rglob("*") if path.is_file() and not any(
            fnmatch.fnmatch(part, pattern) for part in path.relative_to(ROOT / "csrc").parts for pattern in IGNORED))
        assert {source.name for source in sources} >= set(_ext.SOURCES)
        for source in sources:  # every file of csrc/, byte for byte
            name = source.relative_to(ROOT / "csrc").as_posix()
            assert archive.read(f"flashmla_ops/csrc/{name}") == source.read_bytes(), name
        shipped = {name.removeprefix("flashmla_ops/csrc/") for name in names if name.startswith("flashmla_ops/csrc/")}
        assert shipped == {source.relative_to(ROOT / "csrc").as_posix() for source in sources}  # and nothing else
        for name in CHECKPOINT:
            assert f"models/assets/deepseek-v32-tiny-kjv/{name}" in names
        assert "flashmla_ops/build.py" in names
        (license_file,) = [name for name in names if name.endswith(".dist-info/licenses/LICENSE")]  # the declared MIT
        assert archive.read(license_file) == (ROOT / "LICENSE").read_bytes()
        assert not any(name.endswith((".so", ".pyc")) for name in names)


def test_csrc_holds_the_sources_the_build_compiles_and_the_headers_they_include():
    """Nothing else lies in csrc/ (a wheel ships all of it): a patch's dense_decode_narrow.cu.orig, a stale copy of
    the narrow kernel, was committed there and shipped."""
    wanted, pending = set(), list(_ext.SOURCES)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending += re.findall(r'^#include "([^"]+)"', (ROOT / "csrc" / name).read_text(), re.M)
    assert {path.name for path in (ROOT / "csrc").iterdir()} == wanted


def test_the_installed_package_finds_its_sources_and_checkpoint(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    probe = ("import flashmla_ops, models; from flashmla_ops import _ext; from models.loading import load_config; "
             "print(flashmla_ops.__file__); print(_ext.PACKAGE_CSRC); print(_ext.CSRC); "
             "print([n for n in _ext.SOURCES if not (_ext.CSRC / n).exists()]); "
             "print(load_config(models.SHIPPED_CHECKPOINT)[1]['model_type']); print(_ext.build_name([], _ext.CSRC))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("FLASHMLA_CSRC", None)
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    package, package_csrc, csrc, missing, model_type, name = result.stdout.split("\n")[:6]
    assert Path(package).resolve().is_relative_to(target.resolve())  # not the checkout's editable install
    assert Path(package_csrc) == target.resolve() / "flashmla_ops" / "csrc" == Path(csrc)
    assert missing == "[]"
    assert model_type == "deepseek_v32"
    assert name.startswith("flashmla_ops_cuda_csrc")  # not the checkout's build directory (a rebuild each switch)


def test_sources_in_the_package_come_before_the_checkouts(tmp_path):
    package = tmp_path / "flashmla_ops"
    package.mkdir()
    assert _ext._package_csrc(package) == tmp_path / "csrc"  # an editable install: the checkout's csrc/
    (package / "csrc").mkdir()
    assert _ext._package_csrc(package) == package / "csrc"  # a wheel: its own copy
    if Path(_ext.__file__).resolve().is_relative_to(ROOT):  # these tests run on this checkout's package
        assert _ext.PACKAGE_CSRC == ROOT / "csrc"


def test_a_wheels_sources_build_apart_from_a_checkouts(tmp_path):
    """Two environments (a wheel's csrc, a checkout's) do not share a build directory, which each would rebuild."""
    assert _ext.build_name([], _ext.CHECKOUT_CSRC) == "flashmla_ops_cuda"
    installed = _ext.build_name([], tmp_path / "site-packages" / "flashmla_ops" / "csrc")
    other_venv = _ext.build_name([], tmp_path / "venv2" / "site-packages" / "flashmla_ops" / "csrc")
    assert len({"flashmla_ops_cuda", installed, other_venv}) == 3 and installed.isidentifier()


def test_toolchain_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert _ext.toolchain_reason() == "this torch build has no CUDA"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(_ext.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    # nvcc where torch's extension builder finds it without PATH or CUDA_HOME (/usr/local/cuda, CUDA_PATH)
    monkeypatch.setattr(_ext, "_found_cuda_home", lambda: "/usr/local/cuda")
    assert _ext.toolchain_reason() is None
    monkeypatch.setattr(_ext, "_found_cuda_home", lambda: None)
    assert "nvcc not found" in _ext.toolchain_reason()
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert _ext.toolchain_reason() is None
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "bindings.cpp").write_text("")
    monkeypatch.setattr(_ext, "CSRC", tmp_path / "csrc")
    reason = _ext.toolchain_reason()
    assert reason.startswith(f"csrc sources missing under {tmp_path / 'csrc'}: ['kv_cache.cu'")
    assert "bindings.cpp" not in reason


def test_build_cli_says_why_it_cannot_build(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "toolchain_reason", lambda: "nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    monkeypatch.setattr(_ext, "build_extension", lambda verbose: pytest.fail("no build without a toolchain"))
    assert build.main([]) == 1
    assert capsys.readouterr().err == ("flashmla_ops.build: cannot build the CUDA kernels here: nvcc not found (set "
                                       "CUDA_HOME or put nvcc on PATH)\n")


def test_build_cli_builds_and_names_the_library(monkeypatch, capsys):
    calls = []

    def fake_build(verbose):
        calls.append(verbose)
        return types.SimpleNamespace(__file__="/cache/flashmla_ops_cuda/flashmla_ops_cuda.so")

    monkeypatch.setattr(_ext, "toolchain_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", fake_build)
    assert build.main(["--verbose"]) == 0
    assert calls == [True]
    assert capsys.readouterr().out.endswith("flashmla_ops.build: built /cache/flashmla_ops_cuda/flashmla_ops_cuda.so\n")


def test_build_cli_shows_the_build_as_flashmla_verbose_build_says(faked_build, monkeypatch):
    """FLASHMLA_VERBOSE_BUILD=1 shows the build here as on first use (the command line passed False without
    --verbose, so the variable was ignored); --verbose shows it either way."""
    _, calls = faked_build
    monkeypatch.setattr(_ext, "toolchain_reason", lambda: None)
    for argv, variable, shown in (([], "0", False), ([], "1", True), (["--verbose"], "0", True)):
        monkeypatch.setenv("FLASHMLA_VERBOSE_BUILD", variable)
        assert build.main(argv) == 0
        assert calls.pop()["verbose"] is shown, (argv, variable)


def test_build_cli_reports_a_failed_build(monkeypatch, capsys):
    def failing_build(verbose):
        raise RuntimeError("[1/7] nvcc ... dense_decode.cu\ndense_decode.cu(12): error: identifier \"x\" is undefined"
                           "\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr(_ext, "toolchain_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", failing_build)
    assert build.main([]) == 1
    assert capsys.readouterr().err == ('flashmla_ops.build: the build failed: dense_decode.cu(12): error: identifier '
                                       '"x" is undefined (--verbose shows it)\n')


def test_build_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "flashmla_ops.build", "--help"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("usage: python -m flashmla_ops.build")


@pytest.mark.gpu
@HOPPER
def test_the_prebuilt_kernels_are_the_ones_the_ops_load():
    env = {key: value for key, value in os.environ.items() if key != "FLASHMLA_CSRC"}
    result = subprocess.run([sys.executable, "-m", "flashmla_ops.build"], capture_output=True, text=True, env=env,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr
    built = result.stdout.strip().splitlines()[-1].removeprefix("flashmla_ops.build: built ")
    probe = "from flashmla_ops import _ext; print(_ext.extension().__file__)"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT,
                            check=True).stdout.strip().splitlines()[-1]
    assert Path(built).resolve() == Path(loaded).resolve()


def test_every_environment_variable_the_package_reads_is_in_the_readme():
    """The README's table of environment variables names each FLASHMLA_* variable flashmla_ops reads."""
    package = ROOT / "flashmla_ops"
    read = set()
    for source in package.rglob("*.py"):
        read |= set(re.findall(r"\bFLASHMLA_[A-Z_]+\b", source.read_text()))
    assert {"FLASHMLA_BACKEND", "FLASHMLA_CHECK", "FLASHMLA_CSRC"} <= read
    table = (ROOT / "README.md").read_text().split("Environment variables", 1)[1].split("\n\n", 2)[1]
    documented = set(re.findall(r"^\| `(FLASHMLA_[A-Z_]+)`", table, re.M))
    assert read == documented, f"read but not in the README's table: {sorted(read - documented)}; documented but " \
                               f"not read: {sorted(documented - read)}"


@pytest.fixture
def faked_build(monkeypatch, tmp_path):
    """A GPU machine that can build (faked), TORCH_EXTENSIONS_DIR in tmp_path, and torch's `load` replaced by a record
    of what it saw when called: whether the build's lock file existed and whether `ninja` was on PATH."""
    import torch.utils.cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    for name in (_ext.CSRC_ENV, _ext.EXTRA_FLAGS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_ext, "_unavailable_reason", lambda: None)
    lock = tmp_path / "extensions" / _ext.build_name([], _ext.CSRC) / "lock"
    calls = []

    def load(**kwargs):
        calls.append({"lock": lock.exists(), "ninja": shutil.which("ninja"), "PATH": os.environ.get("PATH"),
                      "verbose": kwargs["verbose"]})
        return types.SimpleNamespace(__file__="built.so")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    return lock, calls


def test_a_lock_left_by_a_killed_build_falls_back_instead_of_hanging(faked_build, caplog):
    """torch's build lock (TORCH_EXTENSIONS_DIR/<name>/lock) left by a build that was killed (the first op call on a
    GPU builds for ~90 s): torch's `load` waits on it forever without a word; the ops warn, naming it, and take the
    next path."""
    lock, calls = faked_build
    lock.parent.mkdir(parents=True)
    lock.touch()
    left = time.time() - 31 * 60  # the README: "a lock left more than 30 minutes ago"
    os.utime(lock, (left, left))
    taken_for_live = threading.Timer(5, lock.unlink)  # a longer wait ends here, in a build: a failure, not a hang
    taken_for_live.start()
    try:
        with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
            assert _ext._load.__wrapped__() is None
    finally:
        taken_for_live.cancel()
    assert calls == []
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1 and str(lock) in said[0] and "killed" in said[0]


def test_a_build_in_progress_elsewhere_is_waited_for(faked_build, caplog):
    """Even one that took its lock 29 minutes ago (a build with MAX_JOBS=1 takes minutes)."""
    lock, calls = faked_build
    lock.parent.mkdir(parents=True)
    lock.touch()
    taken = time.time() - 29 * 60
    os.utime(lock, (taken, taken))
    other_build = threading.Timer(0.3, lock.unlink)
    other_build.start()
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        assert _ext._load.__wrapped__().__file__ == "built.so"
    other_build.join()
    assert [call["lock"] for call in calls] == [False]
    assert [r.getMessage() for r in caplog.records] == [
        f"flashmla_ops: waiting for another process's build of the CUDA kernels ({lock})"]


def test_the_ninja_package_builds_without_its_environment_on_path(faked_build, monkeypatch, tmp_path):
    """`ninja` is a dependency, but its executable is on PATH only while its environment is activated; torch's builder
    runs it by name ("Ninja is required to load C++ extensions (pip install ninja to get it)", where it is installed):
    `/venv/bin/python serve.py` fell back to the Triton kernels on a Hopper GPU, and the build command failed."""
    ninja = pytest.importorskip("ninja")
    _, calls = faked_build
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    assert _ext.toolchain_reason() is None
    assert _ext._load.__wrapped__().__file__ == "built.so"
    assert calls[0]["ninja"] is not None and Path(calls[0]["ninja"]).parent == Path(ninja.BIN_DIR)
    assert os.environ["PATH"] == str(empty)  # as it was, after the build
    monkeypatch.setitem(sys.modules, "ninja", None)  # no ninja package either: said before any build is tried
    assert _ext.toolchain_reason() == "ninja not found (pip install ninja, or put it on PATH)"
