"""Builds and loads the CUDA kernels of `csrc/` with ninja (torch.utils.cpp_extension.load), once per process.

`kernels(device)` returns the loaded module when the op should run its CUDA kernel on `device`, else None
(the op then runs its reference). `FLASHMLA_BACKEND=reference` forces the reference everywhere;
`backend(device)` says which path an op on that device takes.
"""
import functools
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("flashmla_ops")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
BACKEND_ENV = "FLASHMLA_BACKEND"
SOURCES = ("bindings.cpp", "kv_cache.cu")


def _unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    missing = [name for name in SOURCES if not (CSRC / name).exists()]
    if missing:
        return f"csrc sources missing under {CSRC}: {missing} (install with `pip install -e .` from a checkout)"
    return None


def _arch_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


@functools.cache
def _load():
    reason = _unavailable_reason()
    if reason is not None:
        log.warning("flashmla_ops: CUDA kernels not built (%s); using the PyTorch reference ops", reason)
        return None
    from torch.utils.cpp_extension import load

    try:
        return load(
            name="flashmla_ops_cuda",
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr", "-lineinfo", *_arch_flags()],
            verbose=os.environ.get("FLASHMLA_VERBOSE_BUILD", "0") == "1",
        )
    except (RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.warning("flashmla_ops: building the CUDA kernels failed (%s); using the PyTorch reference ops", first_line)
        return None


def backend(device: torch.device | str) -> str:
    """'cuda' when the op's CUDA kernel runs on `device`, else 'reference'."""
    device = torch.device(device)
    if device.type != "cuda" or os.environ.get(BACKEND_ENV, "auto") == "reference":
        return "reference"
    return "cuda" if _load() is not None else "reference"


def kernels(device: torch.device | str):
    return _load() if backend(device) == "cuda" else None
