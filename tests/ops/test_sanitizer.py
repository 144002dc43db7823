"""Every GPU kernel of the ops (CUDA, and Triton where an op has no CUDA one) under NVIDIA's compute-sanitizer
(scripts/sanitize_ops.py's edge cases, each tensor an allocation of its own): memcheck (no access outside an
allocation: stop 52's found a shared-memory read past a top-k row) and initcheck (no read of global memory that nothing
wrote, e.g. a combine reading a split slot no CTA stored). On a Hopper GPU with compute-sanitizer on PATH; a minute or
two each (stop 52's H100: 56 s and 28 s for the 55 cases then; 99 in stop 53, 103 since: memcheck passed on the H100 and
initcheck in 60 s on the H200, once the top-k reference ran on the CPU)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from decode_inputs import HOPPER

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = [
    pytest.mark.gpu,
    HOPPER,
    pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="needs compute-sanitizer on PATH"),
]


@pytest.mark.parametrize("tool", ["memcheck", "initcheck"])
def test_gpu_kernels_under_compute_sanitizer(tool):
    from flashmla_ops import _ext
    # built here, outside the sanitizer (which would follow the compilers); without it every case would run Triton or
    # the reference, and sanitize_ops.py fails a case that runs an op's reference on the GPU
    assert _ext.extension() is not None, "the CUDA kernels did not build or load"
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["compute-sanitizer", "--tool", tool, "--error-exitcode", "9", "--print-limit", "10",
                           sys.executable, str(ROOT / "scripts" / "sanitize_ops.py")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    report = done.stdout + done.stderr
    assert done.returncode == 0 and "ERROR SUMMARY: 0 errors" in report, report[-6000:]
    assert "0 case(s) failed" in report, report[-6000:]
