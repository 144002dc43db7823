"""Compile a Triton kernel variant for sm_90 as the op launches it (tests/ops/test_triton_compile.py's compile_kernel:
the same signature and divisibility specialization), write its TTIR, TTGIR, LLVM IR, PTX, cubin and SASS to
OUTPREFIX.*, and print registers, spills and stack (ptxas -v on the PTX; ptxas on PATH), shared memory and counts of
TTGIR ops (async copies: the loads the compiler pipelined). No GPU needed. From the repository root (stop 34 used
Triton 3.6, the device's version, installed with `pip install --target /tmp/t36 --no-deps triton==3.6.0`):

    PYTHONPATH=/tmp/t36 python docs/bench/triton_asm.py indexer._indexer_logits_kernel \
        '{"PAGED": false, "Q_FP8": true, "K_FP8": false, "K_SCALED": true, "HW_FP8": true, "BLOCK_Q": 4, "H_PAD": 64,
          "BLOCK_N": 64, "D_I": 128, "F16": true, "FP8_MMA": false}' '{"num_warps": 8, "num_stages": 3}' /tmp/ix
    python docs/bench/sass_loop.py /tmp/ix.sass      # the main loop's SASS instruction histogram
"""
import json, re, sys, os, subprocess
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "tests", "ops"))
import triton
src = open("tests/ops/test_triton_compile.py").read()
code = re.search(r"COMPILER = r'''(.*?)'''", src, re.S).group(1)
code = code.split("results = {}")[0]
exec(code)
name, constexprs, options, prefix = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
ARCH = int(os.environ.get("ARCH", "90"))  # the GPU compiled for: sm_90 unless ARCH says (80, 89, 120)
k = compile_kernel(name, constexprs, ARCH, options)
md = k.metadata
for ext in ("ttir", "ttgir", "llir", "ptx"):
    open(f"{prefix}.{ext}", "w").write(k.asm[ext])
open(f"{prefix}.cubin", "wb").write(k.asm["cubin"])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
sass = subprocess.run([cuobjdump, "-sass", f"{prefix}.cubin"],
                      capture_output=True, text=True).stdout
open(f"{prefix}.sass", "w").write(sass)
ttgir = k.asm["ttgir"]
ptxas = subprocess.run(["ptxas", f"-arch=sm_{ARCH}a" if ARCH == 90 else f"-arch=sm_{ARCH}", "-v", f"{prefix}.ptx", "-o",
                        "/dev/null"], capture_output=True,
                       text=True).stderr
regs = re.findall(r"Used (\d+) registers", ptxas); spill = re.findall(r"(\d+) bytes spill stores", ptxas)
stack = re.findall(r"(\d+) bytes stack frame", ptxas)
print(triton.__version__, "regs", regs, "spill", spill, "stack", stack, "shared", md.shared,
      "async_copy", ttgir.count("async_copy_global_to_local"), "tma", ttgir.count("async_tma_copy"),
      "wgmma", ttgir.count("warp_group_dot"), "tt.dot", ttgir.count("tt.dot "), "tt.load", ttgir.count("tt.load "),
      "local_alloc", ttgir.count("local_alloc"), "convert_layout", ttgir.count("convert_layout"))
