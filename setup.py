"""Copies `csrc/` into the built package as `flashmla_ops/csrc/`, so that a wheel or a non-editable install carries
the CUDA sources its kernels build from on first use (an editable install reads the checkout's `csrc/`). Everything
else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
IGNORED = ("__pycache__", "*.o", "*.so", ".*")  # build leftovers and hidden files (tests/ops/test_packaging.py too)


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "flashmla_ops" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns(*IGNORED))


setup(cmdclass={"build_py": BuildPyWithCsrc})
