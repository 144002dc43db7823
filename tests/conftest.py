import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def reference_runs():
    """The names of the ops that run their PyTorch references during the test (`flashmla_ops.reference_runs`): GPU
    tests of a kernel assert it is empty, or they could compare the reference with itself (a reference also captures
    and replays in a CUDA graph)."""
    import flashmla_ops
    with flashmla_ops.reference_runs() as runs:
        yield runs


@pytest.fixture
def cuda_calls(monkeypatch):
    """The names of the CUDA extension's functions the ops call (GPU tests of which kernel an op runs)."""
    from flashmla_ops import _ext
    calls = []
    real = _ext.extension()

    class Spy:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    monkeypatch.setattr(_ext, "extension", lambda: Spy())
    return calls
