"""What the compiler made of each CUDA kernel, without a GPU: registers, spills, stack and shared memory from
`ptxas -v`, and from the SASS the tensor-core instructions (HGMMA: Hopper's wgmma), their waits, the TMA and cp.async
copies and the local-memory traffic (spills that reached the code). The flags are the extension's own
(flashmla_ops._ext), so the figures are those of the kernels that run.

    python scripts/kernel_report.py                      # every source, a table, and bench/kernels.json
    python scripts/kernel_report.py --sources dense_decode.cu --out bench/dense

Each source compiles to its own cubin (nvcc, sm_90a; a minute or two for the decode kernels on two cores).
`cuobjdump` comes from the CUDA toolkit or, where that has none, from Triton's NVIDIA backend."""
import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

import torch.utils.cpp_extension as cpp_extension

from flashmla_ops import _ext

# SASS opcodes counted per kernel (the opcode's first word, before its first '.'): what the issues ask the kernels
# to show (HGMMA) and what most often explains a gap (waits, copies, local memory).
COUNTED = {
    "HGMMA": "wgmma on bf16 / f16 operands (tensor cores)",
    "QGMMA": "wgmma on fp8 operands",
    "WARPGROUP": "wgmma fences and waits (WARPGROUP.ARRIVE / DEPBAR)",
    "UTMALDG": "TMA loads",
    "LDGSTS": "cp.async copies",
    "BAR": "named and CTA barriers",
    "LDL": "local-memory loads",
    "STL": "local-memory stores",
}
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")
SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)")


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    sys.exit("kernel_report: cuobjdump not found (install the CUDA toolkit, or triton, whose NVIDIA backend has one)")


def nvcc_command(source: Path, cubin: Path, workdir: Path) -> list[str]:
    """nvcc with the extension's flags and include paths, to a cubin, with ptxas' per-kernel report. A CPU build of
    torch ships c10/cuda's headers but not the one its CMake generates; `workdir` gets a stand-in (after torch's own
    on the include path), so that the kernels compile on a machine without a GPU too."""
    nvcc = shutil.which("nvcc") or str(Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin" / "nvcc")
    stand_in = workdir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stand_in.parent.mkdir(parents=True, exist_ok=True)
    stand_in.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], str(workdir)]
    return [nvcc, "-cubin", "-o", str(cubin), str(source), "-std=c++17", "-O3", "--expt-relaxed-constexpr",
            "-lineinfo", *_ext.ARCH_FLAGS, "-Xptxas", "-v", "-DTORCH_EXTENSION_NAME=kernel_report",
            "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__", *[f"-I{path}" for path in includes]]


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spill bytes, stack frame and static shared memory."""
    kernels, current = {}, None
    for line in text.splitlines():
        if match := PTXAS_ENTRY.search(line):
            current = kernels.setdefault(match.group(1), {})
        elif current is not None and (match := PTXAS_FRAME.search(line)):
            current.update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                           spill_loads=int(match.group(3)))
        elif current is not None and (match := PTXAS_USED.search(line)):
            current.update(registers=int(match.group(1)), static_smem=int(match.group(2) or 0))
    return kernels


def parse_sass(text: str) -> dict[str, dict]:
    """Per mangled kernel name: its SASS instruction count, the COUNTED opcodes' and the wgmmas' by shape."""
    kernels, current = {}, None
    for line in text.splitlines():
        if match := SASS_FUNCTION.match(line):
            current = kernels.setdefault(match.group(1), {"instructions": 0, "counts": Counter(), "shapes": Counter()})
        elif current is not None and (match := SASS_INSTRUCTION.search(line)):
            opcode, suffix = match.groups()
            current["instructions"] += 1
            if opcode in COUNTED:
                current["counts"][opcode] += 1
            if opcode in ("HGMMA", "QGMMA"):  # HGMMA.64x64x16.F32.BF16: the shape is the first suffix
                shape = suffix.split(".")[1] if "." in suffix else "?"
                current["shapes"][shape if opcode == "HGMMA" else f"fp8 {shape}"] += 1
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {name: name for name in names}
    result = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, result.stdout.splitlines()))


def short_name(demangled: str) -> str:
    """`void flashmla::dense_decode_kernel<true, false, true, false>(flashmla::DecodeParams)` ->
    `dense_decode_kernel<1,0,1,0>`."""
    name = re.sub(r"^void\s+|\(anonymous namespace\)::|flashmla::", "", demangled)
    return name.split("(")[0].replace("true", "1").replace("false", "0").replace(", ", ",")


def report(source: Path, cuobjdump: str, workdir: Path) -> list[dict]:
    cubin = workdir / (source.stem + ".cubin")
    built = subprocess.run(nvcc_command(source, cubin, workdir), capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"kernel_report: nvcc failed on {source.name}:\n{built.stderr[-3000:]}")
    ptxas = parse_ptxas(built.stderr + built.stdout)
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    names = demangle(sorted(ptxas))
    rows = []
    for mangled in sorted(ptxas, key=lambda name: names[name]):
        code = sass.get(mangled, {"instructions": 0, "counts": Counter(), "shapes": Counter()})
        rows.append({"source": source.name, "kernel": short_name(names[mangled]), "mangled": mangled,
                     **ptxas[mangled], "instructions": code["instructions"], "counts": dict(code["counts"]),
                     "wgmma_shapes": dict(code["shapes"])})
    return rows


def print_table(rows: list[dict]) -> None:
    header = f"{'kernel':<58} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'SASS':>6} {'wgmma':>5} " \
             f"{'fence':>5} {'TMA':>4} {'cp.async':>8} {'LDL/STL':>7}  wgmma shapes (HGMMA; fp8: QGMMA)"
    print(header)
    for row in rows:
        counts = row["counts"]
        wgmma = counts.get("HGMMA", 0) + counts.get("QGMMA", 0)
        shapes = ", ".join(f"{shape} x{count}" for shape, count in sorted(row["wgmma_shapes"].items()))
        print(f"{row['kernel'][:58]:<58} {row.get('registers', 0):>4} "
              f"{row.get('spill_stores', 0):>5}/{row.get('spill_loads', 0):<5} {row.get('stack', 0):>5} "
              f"{row['instructions']:>6} {wgmma:>5} {counts.get('WARPGROUP', 0):>5} "
              f"{counts.get('UTMALDG', 0):>4} {counts.get('LDGSTS', 0):>8} "
              f"{counts.get('LDL', 0) + counts.get('STL', 0):>7}  {shapes}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels = [name for name in _ext.SOURCES if name.endswith(".cu")]
    parser.add_argument("--sources", nargs="+", default=kernels, choices=kernels, metavar="FILE.cu",
                        help=f"which csrc files (default: all of {', '.join(kernels)})")
    parser.add_argument("--out", default="bench/kernels", help="output prefix for the .json")
    args = parser.parse_args()
    cuobjdump = find_cuobjdump()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.sources:
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            rows += report(_ext.CSRC / name, cuobjdump, Path(workdir))
    print_table(rows)
    out = Path(args.out + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"arch": _ext.ARCH_FLAGS, "kernels": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
