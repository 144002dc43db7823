"""Copies `csrc/` into the built package as `flashmla_ops/csrc/`, so that a wheel or a non-editable install carries
the CUDA sources its kernels build from on first use (an editable install reads the checkout's `csrc/`). Everything
else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
CSRC_SUFFIXES = (".cu", ".cuh", ".cpp", ".h")


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "flashmla_ops" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for source in sorted(CSRC.iterdir()):
            if source.suffix in CSRC_SUFFIXES:
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
