"""scripts/ab_kernels.py times nothing when a side's CUDA kernels are not there (here: no GPU), and says which; its
rounds alternate which side goes first."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = importlib.util.spec_from_file_location("ab_kernels", ROOT / "scripts" / "ab_kernels.py")
ab_kernels = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(ab_kernels)


def test_rounds_alternate_which_side_goes_first():
    orders = [ab_kernels.round_order(index) for index in range(1, 5)]
    assert orders == [("tree", "base"), ("base", "tree"), ("tree", "base"), ("base", "tree")]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal path: without a GPU neither side builds")
def test_ab_kernels_refuses_to_time_without_kernels(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "ab_kernels.py"), "--base-csrc",
                             str(ROOT / "csrc"), "--", str(ROOT / "scripts" / "bench_decode.py")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "no timing: the tree and base kernels did not build" in result.stderr
    assert "== tree" not in result.stdout
