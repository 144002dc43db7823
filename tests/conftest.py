import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def reference_runs(monkeypatch):
    """The names of the ops that run their PyTorch references during the test (each op says so through
    `_ext.reference_fallback`): GPU tests of a kernel assert it is empty, or they could compare the reference with
    itself (a reference also captures and replays in a CUDA graph)."""
    from flashmla_ops import _ext
    runs, announce = [], _ext.reference_fallback

    def recording(op, device):
        runs.append(op)
        announce(op, device)

    monkeypatch.setattr(_ext, "reference_fallback", recording)
    return runs


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
