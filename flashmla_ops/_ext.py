"""Builds and loads the CUDA kernels of `csrc/` with ninja (torch.utils.cpp_extension.load), once per process.

`backend(op, device)` says which path an op takes on a device (CUDA kernel, Triton kernel or reference);
`FLASHMLA_BACKEND=cuda|triton|reference` restricts it, and `reference_runs()` records the calls that ran a reference.
`kernels(op, device)` returns the loaded extension when the op's CUDA kernel runs. For kernel experiments:
`FLASHMLA_CSRC=DIR` builds another revision's csrc (e.g. `git archive BRANCH csrc | tar -x -C bench/BRANCH`) in place
of the package's, and `FLASHMLA_EXTRA_CUDA_FLAGS` adds nvcc flags; each directory and flag set gets a build of its own
(`build_name`).
"""
import contextlib
import functools
import hashlib
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import torch

from ._checks import env_flag

log = logging.getLogger("flashmla_ops")


def _package_csrc(package: Path) -> Path:
    """The CUDA sources: `flashmla_ops/csrc/` in an installed wheel (setup.py copies them there), else the
    checkout's `csrc/` beside the package (an editable install)."""
    installed = package / "csrc"
    return installed if installed.is_dir() else package.parent / "csrc"


PACKAGE_CSRC = _package_csrc(Path(__file__).resolve().parent)
CHECKOUT_CSRC = (Path(__file__).resolve().parent.parent / "csrc").resolve()  # the build not named by its directory
CSRC_ENV = "FLASHMLA_CSRC"
EXTRA_FLAGS_ENV = "FLASHMLA_EXTRA_CUDA_FLAGS"
CSRC = Path(os.environ[CSRC_ENV]).resolve() if os.environ.get(CSRC_ENV) else PACKAGE_CSRC
BACKEND_ENV = "FLASHMLA_BACKEND"
SOURCES = ("bindings.cpp", "kv_cache.cu", "mla_metadata.cu", "dense_decode.cu", "dense_decode_narrow.cu",
           "indexer_topk.cu", "indexer_logits.cu", "indexer_logits_paged.cu")
ARCH_FLAGS = ("-gencode=arch=compute_90a,code=sm_90a",)  # the only architecture _unavailable_reason lets through


_ONCE_LOCK = threading.RLock()


def _once(function):
    """`functools.cache` of a function without arguments that also holds across threads: the first call runs it
    (a build, an import) while concurrent first calls wait for its result instead of running it again."""
    cached = functools.cache(function)

    @functools.wraps(function)
    def wrapper():
        with _ONCE_LOCK:
            return cached()

    wrapper.cache_clear = cached.cache_clear
    return wrapper


def _unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if torch.version.cuda is None:  # before asking the device (a faked one in tests) anything
        return "this torch build has no CUDA"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):  # wgmma and TMA: sm_90a only. Elsewhere a build would fail after ~90 s, every process
        return f"they are written for sm_90 (Hopper) and this GPU is sm_{major}{minor}"
    return toolchain_reason()


def toolchain_reason() -> str | None:
    """Why the CUDA kernels cannot be compiled here (None: they can). A GPU is not needed to compile them: see
    `python -m flashmla_ops.build`."""
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME") and _found_cuda_home() is None:
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if shutil.which("ninja") is None and _ninja_dir() is None:
        return "ninja not found (pip install ninja, or put it on PATH)"
    missing = [name for name in SOURCES if not (CSRC / name).exists()]
    if missing:
        return f"csrc sources missing under {CSRC}: {missing} (reinstall: `pip install .` or `pip install -e .`)"
    return None


def _found_cuda_home() -> str | None:
    """Where torch's extension builder finds CUDA without CUDA_HOME or nvcc on PATH (CUDA_PATH, /usr/local/cuda), if
    nvcc is there: a build would succeed, so the kernels are not given up for want of PATH."""
    from torch.utils.cpp_extension import _find_cuda_home

    home = _find_cuda_home()
    return home if home and (Path(home) / "bin" / "nvcc").exists() else None


def _ninja_dir() -> str | None:
    """Where the `ninja` package (a dependency) put its executable, when PATH has no ninja: an environment's bin/ is
    on PATH only while it is activated (not for `/venv/bin/python serve.py`), and torch's builder runs `ninja` by
    name, failing with "Ninja is required ... (pip install ninja to get it)" where it is installed."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja
    except ImportError:
        return None
    directory = getattr(ninja, "BIN_DIR", None)
    found = directory is not None and os.access(Path(directory) / "ninja", os.X_OK)
    return str(directory) if found else None


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the `ninja` package's directory appended while the build runs, where PATH has no ninja of its own."""
    directory = _ninja_dir()
    if directory is None:
        yield
        return
    before = os.environ.get("PATH")
    os.environ["PATH"] = os.pathsep.join(filter(None, (before, directory)))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = before


# A build takes about 90 s (minutes with MAX_JOBS=1); torch's lock file in the build directory older than this was
# left by a build that was killed.
BUILD_LOCK_STALE_S = 30 * 60


def _wait_for_build_lock(lock: Path, stale_after_s: float = BUILD_LOCK_STALE_S, poll_s: float = 0.5) -> None:
    """Waits, saying so once, while another process builds into the same directory, as torch's `load` would; but a
    lock that a killed build left (Ctrl-C, a timeout, the OOM killer during the ~90 s first op call) is a RuntimeError
    naming it: torch's FileBaton waits on it forever and silently, so every later process hung at its first op call
    on a GPU (and `python -m flashmla_ops.build` with it)."""
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > stale_after_s:
            raise RuntimeError(f"the build lock {lock} is {age / 60:.0f} minutes old: a build that was killed left it "
                               f"(delete it to build again)")
        if not said:
            log.warning("flashmla_ops: waiting for another process's build of the CUDA kernels (%s)", lock)
            said = True
        time.sleep(poll_s)


def build_name(extra_flags: list[str], csrc: Path) -> str:
    """The extension's name, which names its build directory: one per nvcc flag set and per csrc directory, so that a
    build with other flags or of another revision's kernels never replaces the package's own, and installs in two
    environments (a wheel's csrc, a checkout's) do not rebuild over each other. A checkout's own csrc keeps the plain
    name. Another directory's name also hashes its sources' contents: ninja rebuilds by modification times, and an
    older revision extracted over it (`git archive`, as scripts/ab_kernels.py does) is older than its build. The
    flags are spelled out readably and hashed (two flag sets that spell the same)."""
    parts = ["flashmla_ops_cuda"]
    if extra_flags:
        readable = "".join(c if c.isalnum() else "_" for c in "".join(extra_flags))[:48]
        parts.append(readable + hashlib.sha1("\0".join(extra_flags).encode()).hexdigest()[:6])
    directory = Path(csrc).resolve()
    if directory != CHECKOUT_CSRC:
        digest = hashlib.sha1(str(directory).encode())
        for path in sorted(directory.glob("*")) if directory.is_dir() else ():
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes())
        parts.append("csrc" + digest.hexdigest()[:10])
    return "_".join(parts)


@_once
def _load():
    # Kernels asked for by FLASHMLA_CSRC that cannot be built on a GPU machine are an error, not a quiet fallback: a
    # benchmark or test run would otherwise time or test the Triton or reference path under the experiment's name.
    # The same for FLASHMLA_EXTRA_CUDA_FLAGS: an experiment's flags that fail to build must not time the default.
    # CSRC, not the environment: the variable is read at import (set later, it builds the package's csrc), and
    # scripts/ab_kernels.py points CSRC at its base's directory without it.
    asked = [f"{CSRC_ENV}={CSRC}"] if CSRC != PACKAGE_CSRC else []
    asked += [f"{EXTRA_FLAGS_ENV}={os.environ[EXTRA_FLAGS_ENV]}"] if os.environ.get(EXTRA_FLAGS_ENV) else []
    requested = bool(asked) and torch.cuda.is_available()
    reason = _unavailable_reason()
    if reason is not None:
        if requested:
            raise RuntimeError(f"{', '.join(asked)}: the CUDA kernels cannot be built: {reason}")
        log.warning("flashmla_ops: CUDA kernels not built (%s); the ops use %s", reason, _fallback())
        return None
    try:
        return build_extension()
    except (RuntimeError, OSError, ImportError) as error:  # ImportError: built, but the library does not load
        if requested:
            raise RuntimeError(f"{', '.join(asked)}: building the CUDA kernels failed") from error
        log.warning("flashmla_ops: building or loading the CUDA kernels failed (%s; FLASHMLA_VERBOSE_BUILD=1 shows "
                    "the build); the ops use %s", build_error(error), _fallback())
        return None


def _fallback() -> str:
    """What the ops run without the CUDA kernels, for the warnings that say so."""
    if _forced() == "cuda":
        return "the PyTorch reference (FLASHMLA_BACKEND=cuda)"
    return "the Triton kernels, else the PyTorch reference" if _triton_importable() else "the PyTorch reference"


def extra_cuda_flags() -> list[str]:
    """The nvcc flags `FLASHMLA_EXTRA_CUDA_FLAGS` adds."""
    return os.environ.get(EXTRA_FLAGS_ENV, "").split()


def cuda_flags(extra: list[str]) -> list[str]:
    """The extension's nvcc flags beyond torch's own, `extra` last: what the build compiles csrc with (and
    scripts/kernel_report.py reports on)."""
    return ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *ARCH_FLAGS, *extra]


def build_extension(verbose: bool | None = None):
    """Compiles the CUDA kernels with ninja, or finds their build up to date, and imports it: the same build,
    keyed by `build_name`, whether it runs on first use or ahead of it (`python -m flashmla_ops.build`)."""
    from torch.utils.cpp_extension import _get_build_directory, load

    extra = extra_cuda_flags()
    if verbose is None:
        verbose = env_flag("FLASHMLA_VERBOSE_BUILD")
    extension_name = build_name(extra, CSRC)
    build_directory = _get_build_directory(extension_name, verbose)  # where load() builds it: TORCH_EXTENSIONS_DIR/name
    _wait_for_build_lock(Path(build_directory) / "lock")
    with _ninja_on_path():
        return load(
            name=extension_name,
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_flags(extra),
            build_directory=build_directory,
            verbose=verbose,
        )


def build_error(error: BaseException, limit: int = 300) -> str:
    """The line of a build or load failure that says what went wrong: ninja's message starts with the first command
    line, so the last line that mentions an error (nvcc's "fatal", a shell's "not found" too), else the first line;
    at most `limit` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    errors = [line for line in lines if any(word in line.lower() for word in ("error", "fatal", "not found"))
              and not line.startswith("[")]
    line = errors[-1] if errors else lines[0]
    return line if len(line) <= limit else line[:limit - 3] + "..."


# Which fast paths each op has (every op of the namespace is here); every op also has its reference.
KERNELS = {
    "get_mla_metadata": ("cuda",),
    "quantize_kv_fp8": ("cuda", "triton"),
    "dequantize_kv_fp8": ("cuda",),
    "write_kv_cache": ("cuda", "triton"),
    "dense_decode": ("cuda", "triton"),
    "sparse_decode": ("cuda", "triton"),
    "sparse_prefill": ("cuda", "triton"),
    "indexer_logits": ("cuda", "triton"),
    "indexer_logits_paged": ("cuda", "triton"),
    "indexer_topk": ("cuda",),
    "routed_experts": ("triton",),
    "write_index_cache": ("triton",),
}
CHOICES = ("auto", "cuda", "triton", "reference")


def _forced() -> str:
    choice = os.environ.get(BACKEND_ENV) or "auto"  # empty: unset
    if choice not in CHOICES:
        raise ValueError(f"{BACKEND_ENV} must be one of {CHOICES}, got {choice!r}")
    return choice


@_once
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        log.warning("flashmla_ops: triton is not installed; using the PyTorch reference ops")
        return False
    return True


def paths(op: str, device: torch.device | str) -> tuple[str, ...]:
    """The fast paths `torch.ops.flashmla.<op>` may take on `device`, best first: 'cuda' (the csrc kernel, where
    built) then 'triton'; each op falls through to the next, and finally to its reference, for shapes a kernel does
    not cover. `FLASHMLA_BACKEND=cuda|triton|reference` restricts the list to that one path."""
    device = torch.device(device)
    forced = _forced()
    if forced == "reference":
        return ()
    if device.type != "cuda":
        if forced != "auto" and op in KERNELS:
            _warn_forced_fallback(op, forced, f"{device.type} tensors (the kernels run on CUDA devices)")
        return ()
    available = KERNELS.get(op, ())
    found = []
    if "cuda" in available and forced in ("auto", "cuda") and _load() is not None and _hopper(device):
        found.append("cuda")
    if "triton" in available and forced in ("auto", "triton") and _triton_importable():
        found.append("triton")
    if forced != "auto" and not found:
        _warn_forced_fallback(op, forced, "no usable kernel of that kind here")
    return tuple(found)


@functools.cache
def _hopper(device: torch.device) -> bool:
    """Whether `device` is an sm_90 GPU: the csrc kernels' only target (the build checks the current device; a
    process may see others; ROCm's torch reads a gfx90a as (9, 0) too)."""
    return torch.version.cuda is not None and torch.cuda.get_device_capability(device) == (9, 0)


def backend(op: str, device: torch.device | str) -> str:
    """The path `torch.ops.flashmla.<op>` takes on `device` for the shapes its kernels support: 'cuda' (the csrc
    kernel), 'triton' or 'reference'. In order: the CUDA kernel where built, else Triton, else the reference;
    `FLASHMLA_BACKEND=cuda|triton|reference` restricts the choice."""
    if op not in KERNELS:
        raise ValueError(f"backend: op must be one of {sorted(KERNELS)} (torch.ops.flashmla's names), got {op!r}")
    found = paths(op, device)
    return found[0] if found else "reference"


def reference_fallback(op: str, device: torch.device | str) -> None:
    """Called by an op that runs its reference: records it for `reference_runs`, and under a forced fast path
    (`FLASHMLA_BACKEND=cuda|triton`) on a GPU says once per op that these inputs are not covered by that kernel (so a
    benchmark of the path does not time the reference unawares)."""
    with _REFERENCE_RECORDS_LOCK:
        open_blocks = tuple(_REFERENCE_RECORDS)
    for runs in open_blocks:
        runs.append(op)
    forced = _forced()
    if forced in ("cuda", "triton") and torch.device(device).type == "cuda":
        _warn_forced_fallback(op, forced, "inputs its kernel does not cover (see the op's docstring)")


_REFERENCE_RECORDS: list[list[str]] = []  # one list per open `reference_runs` block
# Blocks open and close on several threads: finding a block's index and deleting it is not one step under the GIL
_REFERENCE_RECORDS_LOCK = threading.Lock()


@contextlib.contextmanager
def reference_runs():
    """A list of the ops that run their PyTorch reference inside the `with` block, one name per call in call order,
    whatever the device (on CPU tensors every op does) and thread (the record is the process's). A deployment's check
    that nothing falls back off its kernels: `with flashmla_ops.reference_runs() as ran: generate(...)`, then
    `assert not ran` on the GPU."""
    runs: list[str] = []
    with _REFERENCE_RECORDS_LOCK:
        _REFERENCE_RECORDS.append(runs)
    try:
        yield runs
    finally:  # by identity: an enclosing block's list may hold the same names
        with _REFERENCE_RECORDS_LOCK:
            del _REFERENCE_RECORDS[next(i for i, open_runs in enumerate(_REFERENCE_RECORDS) if open_runs is runs)]


_WARNED: set[tuple[str, str]] = set()


def _warn_forced_fallback(op: str, forced: str, why: str) -> None:
    """One warning per op and forced path, whichever reason comes first."""
    if (op, forced) not in _WARNED:
        _WARNED.add((op, forced))
        log.warning("flashmla_ops: %s=%s but %s runs the PyTorch reference: %s", BACKEND_ENV, forced, op, why)


def kernels(op: str, device: torch.device | str):
    """The loaded CUDA extension when `op` runs its csrc kernel on `device`, else None."""
    return extension() if backend(op, device) == "cuda" else None


def extension():
    """The loaded CUDA extension (None where it could not be built): what an op calls once `paths` listed 'cuda',
    without resolving its path again."""
    return _load()
