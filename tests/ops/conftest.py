import zlib

import pytest
import torch

import flashmla_ops  # noqa: F401  (registers torch.ops.flashmla)

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test (and per parameter set), reproducible from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=GPU)])
def device(request):
    """Numerical tests run on CPU (the reference) and, where there is a GPU, on CUDA (the kernels)."""
    return torch.device(request.param)
