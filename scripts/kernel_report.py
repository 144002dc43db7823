"""What the compiler made of each CUDA kernel, without a GPU: registers, spills, stack and shared memory from
`ptxas -v`, and from the SASS the tensor-core instructions (HGMMA: Hopper's wgmma), their waits, the TMA and cp.async
copies and the local-memory traffic (spills that reached the code). The flags are the extension's own
(flashmla_ops._ext), so the figures are those of the kernels that run.

    python scripts/kernel_report.py                      # every source, a table, and bench/kernels.json
    python scripts/kernel_report.py --sources dense_decode.cu --out bench/dense

Each source compiles to its own cubin (nvcc, sm_90a; a minute or two for the decode kernels on two cores).
`cuobjdump` comes from the CUDA toolkit or, where that has none, from Triton's NVIDIA backend."""
import argparse
import importlib.util
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
    "WARPGROUP": "wgmma arrives and waits (WARPGROUP.ARRIVE / DEPBAR)",
    "UTMALDG": "TMA loads by tensor map",
    "UBLKCP": "bulk copies (cp.async.bulk: TMA without a tensor map)",
    "LDGSTS": "cp.async copies",
    "BAR": "named and CTA barriers",
    "LDL": "local-memory loads",
    "STL": "local-memory stores",
}
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(\w+)'")
PTXAS_PROPERTIES = re.compile(r"Function properties for (\S+)")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)")
SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\S*)")


def find_cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    in_toolkit = Path(cpp_extension.CUDA_HOME or "/usr/local/cuda") / "bin" / "cuobjdump"
    if in_toolkit.exists():
        return str(in_toolkit)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
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
    # torch's own nvcc flags for an extension, then the extension's (its build adds the same two sets)
    return [nvcc, "-cubin", "-o", str(cubin), str(source), "-std=c++17", "-DTORCH_EXTENSION_NAME=kernel_report",
            *cpp_extension.COMMON_NVCC_FLAGS, *_ext.cuda_flags(_ext.extra_cuda_flags()), "-Xptxas", "-v",
            *[f"-I{path}" for path in includes]]


def parse_ptxas(text: str) -> dict[str, dict]:
    """Per mangled kernel name: registers, spill bytes, stack frame and static shared memory. A device function that
    was not inlined gets a "Function properties" block of its own inside its caller's report: its frame is not the
    kernel's."""
    kernels, entry, properties_of = {}, None, None
    for line in text.splitlines():
        if match := PTXAS_ENTRY.search(line):
            entry = match.group(1)
            kernels.setdefault(entry, {})
        elif match := PTXAS_PROPERTIES.search(line):
            properties_of = match.group(1)
        elif entry is not None and properties_of == entry and (match := PTXAS_FRAME.search(line)):
            kernels[entry].update(stack=int(match.group(1)), spill_stores=int(match.group(2)),
                                  spill_loads=int(match.group(3)))
        elif entry is not None and (match := PTXAS_REGISTERS.search(line)):
            smem = PTXAS_SMEM.search(line)  # after "used N barriers" and any "N bytes cumulative stack size"
            kernels[entry].update(registers=int(match.group(1)), static_smem=int(smem.group(1)) if smem else 0)
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
    `dense_decode_kernel<1,0,1,0>`: no return type, leading namespaces or parameters."""
    name = re.sub(r"^void\s+|\(anonymous namespace\)::", "", demangled)
    name = re.sub(r"^(\w+::)+", "", name.split("(")[0])
    return name.replace("true", "1").replace("false", "0").replace(", ", ",")


def report(source: Path, cuobjdump: str, workdir: Path) -> list[dict]:
    cubin = workdir / (source.stem + ".cubin")
    built = subprocess.run(nvcc_command(source, cubin, workdir), capture_output=True, text=True)
    if built.returncode != 0:
        sys.exit(f"kernel_report: nvcc failed on {source.name}:\n{built.stderr[-3000:]}")
    ptxas = parse_ptxas(built.stderr + built.stdout)
    sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                     check=True).stdout)
    for mangled in sorted(set(ptxas) ^ set(sass)):  # its row shows "-" where the other report would have a figure
        print(f"kernel_report: {source.name}: {mangled} is in {'ptxas' if mangled in ptxas else 'the SASS'} only",
              file=sys.stderr)
    names = demangle(sorted(set(ptxas) | set(sass)))
    rows = []
    for mangled in sorted(names, key=lambda name: names[name]):
        code = sass.get(mangled, {})
        rows.append({"source": source.name, "kernel": short_name(names[mangled]), "mangled": mangled,
                     **ptxas.get(mangled, {}), "instructions": code.get("instructions"),
                     "counts": dict(code.get("counts", {})), "wgmma_shapes": dict(code.get("shapes", {}))})
    return rows


def print_table(rows: list[dict]) -> None:
    """One line a kernel; "-" where ptxas or the SASS had nothing on it."""
    print(f"{'kernel':<48} {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6} {'SASS':>6} {'wgmma':>5} "
          f"{'wg sync':>7} {'TMA':>4} {'cp.async':>8} {'LDL/STL':>7}  wgmma shapes (HGMMA; fp8: QGMMA)")
    for row in rows:
        def ptxas(key):
            return row.get(key, "-")

        def sass(*opcodes):  # no opcodes: every instruction
            if row["instructions"] is None:
                return "-"
            return sum(row["counts"].get(opcode, 0) for opcode in opcodes) if opcodes else row["instructions"]

        shapes = ", ".join(f"{shape} x{count}" for shape, count in sorted(row["wgmma_shapes"].items()))
        spills = f"{ptxas('spill_stores')}/{ptxas('spill_loads')}"
        print(f"{row['kernel'][:48]:<48} {ptxas('registers'):>4} {spills:>11} {ptxas('stack'):>5} "
              f"{ptxas('static_smem'):>6} {sass():>6} {sass('HGMMA', 'QGMMA'):>5} {sass('WARPGROUP'):>7} "
              f"{sass('UTMALDG', 'UBLKCP'):>4} {sass('LDGSTS'):>8} {sass('LDL', 'STL'):>7}  {shapes}")


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
