"""Builds the CUDA kernels ahead of their first use: `python -m flashmla_ops.build`.

The ops build `csrc/` with ninja the first time a process needs it on a Hopper GPU (about 90 s). This runs the same
build now, so that a container image or a serving host starts with the kernels compiled: it needs `nvcc` and a CUDA
build of torch, not a GPU. The build lands where `torch.utils.cpp_extension` keeps builds (`TORCH_EXTENSIONS_DIR`, by
default under `~/.cache/torch_extensions`), keyed by torch's Python and CUDA versions; a process that later runs the ops
with the same torch, the same `TORCH_EXTENSIONS_DIR` and the same `FLASHMLA_EXTRA_CUDA_FLAGS` finds it up to date and
only loads it. That process needs write access to the build directory (torch takes a lock file there), and the CUDA
toolkit, torch and the package at the paths the build saw (ninja rebuilds when a command line changes). Exits 1 with
the reason when the kernels cannot be built here.
"""
import argparse
import os
import sys

from . import _ext


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flashmla_ops.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true",
                        help="show ninja's and nvcc's output (as FLASHMLA_VERBOSE_BUILD=1 does)")
    args = parser.parse_args(argv)
    reason = _ext.toolchain_reason()
    if reason is not None:
        print(f"flashmla_ops.build: cannot build the CUDA kernels here: {reason}", file=sys.stderr)
        return 1
    print(f"flashmla_ops.build: building {_ext.CSRC} (MAX_JOBS={os.environ.get('MAX_JOBS', 'ninja default')})",
          flush=True)
    try:
        module = _ext.build_extension(verbose=args.verbose or None)  # None: FLASHMLA_VERBOSE_BUILD decides
    except Exception as error:  # noqa: BLE001 (a command line tool: any failure of torch's build is reported)
        print(f"flashmla_ops.build: the build failed: {_ext.build_error(error)} (--verbose shows it)", file=sys.stderr)
        return 1
    print(f"flashmla_ops.build: built {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
