"""scripts/ab_kernels.py times nothing when a side's CUDA kernels are not there (here: no GPU), and says which; its
rounds alternate which side goes first, and each run writes its own output files. A build of other flags or of
another revision's csrc (FLASHMLA_CSRC) gets a build directory of its own, and no build is tried on a GPU that is not
sm_90."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashmla_ops import _ext

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = importlib.util.spec_from_file_location("ab_kernels", ROOT / "scripts" / "ab_kernels.py")
ab_kernels = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ab_kernels)


def test_rounds_alternate_which_side_goes_first():
    orders = [ab_kernels.round_order(index) for index in range(1, 5)]
    assert orders == [("tree", "base"), ("base", "tree"), ("tree", "base"), ("base", "tree")]


def test_several_bases_run_in_order_then_reversed():
    sides = ("tree", "pdl", "other")
    assert ab_kernels.round_order(1, sides) == sides
    assert ab_kernels.round_order(2, sides) == ("other", "pdl", "tree")


def test_sides_are_named_by_their_bench_directory(tmp_path):
    assert ab_kernels.side_names([str(tmp_path / "pdl" / "csrc")]) == ["base"]  # one base: "base", as always
    names = ab_kernels.side_names([str(tmp_path / "pdl" / "csrc"), str(tmp_path / "f16" / "csrc"),
                                   str(tmp_path / "a" / "x" / "csrc"), str(tmp_path / "b" / "x" / "csrc"),
                                   str(tmp_path / "tree" / "csrc")])
    assert names == ["pdl", "f16", "base3", "base4", "base5"]  # shared or reserved names: by position


def test_each_run_writes_its_own_out_prefix():
    script = ["scripts/bench_decode.py", "--out", "bench/dec", "--rows", "h128"]
    assert ab_kernels.side_script(script, "base", 2) == ["scripts/bench_decode.py", "--out", "bench/dec_base_r2",
                                                          "--rows", "h128"]
    assert ab_kernels.side_script(["x.py", "--out=o"], "tree", 1) == ["x.py", "--out=o_tree_r1"]
    assert ab_kernels.side_script(["x.py"], "tree", 1) == ["x.py"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal path: without a GPU neither side builds")
def test_ab_kernels_refuses_to_time_without_kernels(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_kernels.py"), "--base-csrc",
                             str(ROOT / "csrc"), "--", str(ROOT / "scripts" / "bench_decode.py")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "no timing: the tree and base kernels did not build" in result.stderr
    assert "== tree" not in result.stdout


def test_each_flag_set_and_csrc_directory_builds_apart(tmp_path):
    package = _ext.build_name([], _ext.CHECKOUT_CSRC)
    assert package == "flashmla_ops_cuda"  # the name (and build directory) a checkout's own build always had
    phases = _ext.build_name(["-DFLASHMLA_PHASES"], _ext.CHECKOUT_CSRC)
    assert phases.startswith("flashmla_ops_cuda__DFLASHMLA_PHASES") and phases.isidentifier()
    # flags that spell the same once made identifiers build apart
    assert _ext.build_name(["-DSPLITS=2"], _ext.CHECKOUT_CSRC) != _ext.build_name(["-DSPLITS_2"], _ext.CHECKOUT_CSRC)
    other = _ext.build_name([], tmp_path / "branch" / "csrc")
    elsewhere = _ext.build_name([], tmp_path / "main" / "csrc")
    assert len({package, other, elsewhere}) == 3
    # the directory, not its spelling
    assert other == _ext.build_name([], tmp_path / "branch" / ".." / "branch" / "csrc")
    assert other.isidentifier()


def test_another_directorys_build_follows_its_sources_contents(tmp_path):
    """An older revision extracted over a base directory (older modification times than its build: ninja would keep
    the build) gets a build of its own: the name hashes the sources' contents."""
    csrc = tmp_path / "base" / "csrc"
    csrc.mkdir(parents=True)
    (csrc / "dense_decode.cu").write_text("// version 2\n")
    newer = _ext.build_name([], csrc)
    (csrc / "dense_decode.cu").write_text("// version 1\n")
    assert _ext.build_name([], csrc) != newer
    (csrc / "dense_decode.cu").write_text("// version 2\n")
    assert _ext.build_name([], csrc) == newer


def test_extra_cuda_flags_that_cannot_build_raise_on_a_gpu_machine(monkeypatch):
    """FLASHMLA_EXTRA_CUDA_FLAGS asks for an experiment's build: failing it is an error naming the variable (it fell
    back to the Triton kernels with a warning, and a benchmark timed those under the experiment's name)."""
    def failing_build():
        raise RuntimeError("nvcc fatal : Unknown option '-Xbogus'")

    monkeypatch.delenv(_ext.CSRC_ENV, raising=False)
    monkeypatch.setenv(_ext.EXTRA_FLAGS_ENV, "-Xbogus")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", failing_build)
    with pytest.raises(RuntimeError, match="FLASHMLA_EXTRA_CUDA_FLAGS=-Xbogus: building the CUDA kernels failed"):
        _ext._load.__wrapped__()


def test_flashmla_csrc_points_the_build_at_another_directory(tmp_path):
    code = "import flashmla_ops._ext as e; print(e.CSRC)"
    env = {**os.environ, "FLASHMLA_CSRC": str(tmp_path)}
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert Path(shown.stdout.strip()) == tmp_path.resolve()


def test_flashmla_csrc_that_cannot_build_raises_on_a_gpu_machine(tmp_path, monkeypatch):
    """An empty FLASHMLA_CSRC on a machine that has a GPU (faked here): an error naming the variable, where the
    package's own csrc would only warn and fall back."""
    monkeypatch.setenv(_ext.CSRC_ENV, str(tmp_path))
    monkeypatch.setattr(_ext, "CSRC", tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="FLASHMLA_CSRC"):
        _ext._load.__wrapped__()


def test_the_csrc_the_build_uses_decides_whether_its_failure_is_an_error(tmp_path, monkeypatch, caplog):
    """FLASHMLA_CSRC is read at import: set after it, the build takes the package's csrc, whose failure warns and falls
    back (it raised, naming a directory the build never used); a CSRC pointed elsewhere without the variable (as
    scripts/ab_kernels.py does for its base) is an error naming it."""
    def failing_build():
        raise RuntimeError("nvcc failed")

    monkeypatch.delenv(_ext.EXTRA_FLAGS_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", failing_build)
    monkeypatch.setenv(_ext.CSRC_ENV, str(tmp_path))
    monkeypatch.setattr(_ext, "CSRC", _ext.PACKAGE_CSRC)
    with caplog.at_level("WARNING", logger=_ext.log.name):
        assert _ext._load.__wrapped__() is None
    assert "building or loading the CUDA kernels failed" in caplog.text
    monkeypatch.delenv(_ext.CSRC_ENV)
    monkeypatch.setattr(_ext, "CSRC", tmp_path)
    with pytest.raises(RuntimeError, match=f"FLASHMLA_CSRC={tmp_path}: building the CUDA kernels failed"):
        _ext._load.__wrapped__()


def test_the_base_is_tested_on_its_own_kernels(tmp_path):
    argv, env = ab_kernels.pytest_command(str(tmp_path / "base" / "csrc"), ["tests/ops/test_cuda_decode.py"])
    assert argv[1:] == ["-m", "pytest", "-q", "-x", "tests/ops/test_cuda_decode.py"]
    assert env["FLASHMLA_CSRC"] == str((tmp_path / "base" / "csrc").resolve())
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)


def test_the_cuda_kernels_are_not_built_below_or_above_hopper(monkeypatch):
    """On an A100 (sm_80) or any GPU that is not sm_90 the build is not tried (it cannot succeed: wgmma and TMA), so no
    process spends ~90 s on it before falling back to the Triton kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    for capability, built in (((8, 0), False), ((8, 9), False), ((12, 0), False), ((10, 0), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = _ext._unavailable_reason()
        if built:
            assert reason is None or "sm_90" not in reason, reason  # may still lack nvcc or sources here
        else:
            assert reason is not None and f"sm_{capability[0]}{capability[1]}" in reason, reason
