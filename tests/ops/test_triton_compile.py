"""Every Triton kernel compiles for the GPUs it targets, on any machine: every constexpr variant for sm_90 (Hopper) and
sm_80 (Ampere), one variant of each kernel (its hardware-FP8 one where it has one) for sm_89 (Ada), sm_100
(datacenter Blackwell) and sm_120 (consumer Blackwell), and an FP8 variant with the integer e4m3 decoding where a
kernel has one (what ROCm's torch launches, common.hardware_fp8) for AMD's CDNA3 (gfx942, MI300) and CDNA2 (gfx90a,
MI200) through Triton's HIP backend. And where a GPU has less shared memory per block than Hopper (sm_80, sm_89;
sm_120 has sm_89's; CDNA's 64 KiB of LDS), and on sm_100 (B200: tensor memory), each op's ladder of tiles reaches one
that fits (`ladders`, `blackwell_ladders`); no compiled kernel is a trap. The compiles are dealt out over one process
per core.

Triton compiles to a cubin without a GPU; this catches what the CPU interpreter cannot (type inference across
branches, layouts, register and shared-memory limits) over each kernel's constexpr variants. The compiles run in
subprocesses without TRITON_INTERPRET (the test session may have it set, which turns the kernels into interpreted
functions).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from flashmla_ops.triton import moe as triton_moe  # noqa: E402 (after the skip without Triton)

DENSE = {
    "bf16": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, SPLIT=False, APPLY_SINK=False, BLOCK_H=16, BLOCK_N=64,
                 F16=False, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False),
    "bf16-causal-split-sink-half": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, SPLIT=True, APPLY_SINK=True,
                                        BLOCK_H=64, BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=False,
                                        HALF_PARTIALS=True),
    "fp8-hw-split": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False, BLOCK_H=32,
                         BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False),
    "fp8-integer-causal-sink": dict(IS_FP8=True, HW_FP8=False, CAUSAL=True, SPLIT=False, APPLY_SINK=True, BLOCK_H=16,
                                    BLOCK_N=32, F16=False, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False),
    "fp8-f16-hw-split": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False, BLOCK_H=16,
                             BLOCK_N=32, F16=True, PREFETCH=False, RELOAD=False,
                             HALF_PARTIALS=False),  # the default for an FP8 cache up to 16 rows
    "fp8-f16-hw-64": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=False, APPLY_SINK=False, BLOCK_H=16,
                          BLOCK_N=64, F16=True, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False),
    "fp8-f16-integer-causal": dict(IS_FP8=True, HW_FP8=False, CAUSAL=True, SPLIT=False, APPLY_SINK=False,
                                   BLOCK_H=64, BLOCK_N=32, F16=True, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False),
    "fp8-f16-hw-split-prefetch-half": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False,
                                           BLOCK_H=16, BLOCK_N=32, F16=True, PREFETCH=True, RELOAD=False,
                                           HALF_PARTIALS=True),
    "fp8-integer-causal-prefetch": dict(IS_FP8=True, HW_FP8=False, CAUSAL=True, SPLIT=False, APPLY_SINK=False,
                                        BLOCK_H=16, BLOCK_N=32, F16=False, PREFETCH=True, RELOAD=False,
                                        HALF_PARTIALS=False),
    "fp8-f16-hw-split-reload": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False, BLOCK_H=16,
                                    BLOCK_N=32, F16=True, PREFETCH=False, RELOAD=True, HALF_PARTIALS=True),
    "fp8-integer-causal-reload": dict(IS_FP8=True, HW_FP8=False, CAUSAL=True, SPLIT=False, APPLY_SINK=True,
                                      BLOCK_H=16, BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=True,
                                      HALF_PARTIALS=False),
    # the logits masked apart (common.mask_logits_apart): Hopper's default at 64 rows, each of the three logit sums
    "bf16-causal-split-sink-apart": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, SPLIT=True, APPLY_SINK=True,
                                         BLOCK_H=64, BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=False,
                                         HALF_PARTIALS=True, APART=True),
    # the latent as one tile (LaunchConfig.whole, a BF16 cache's option)
    "bf16-whole-causal-split-sink-half-apart": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, SPLIT=True,
                                                    APPLY_SINK=True, BLOCK_H=64, BLOCK_N=64, F16=False,
                                                    PREFETCH=False, RELOAD=False, HALF_PARTIALS=True, APART=True,
                                                    WHOLE=True),
    # more sequences than a grid's second dimension holds (WIDE_BATCH: the batch in the first), one split each as
    # num_splits_for gives so many
    "bf16-whole-apart-wide": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, SPLIT=False, APPLY_SINK=False,
                                  BLOCK_H=64, BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=False,
                                  HALF_PARTIALS=False, APART=True, WHOLE=True, WIDE_BATCH=True),
    "fp8-hw-apart": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False, BLOCK_H=64,
                         BLOCK_N=64, F16=False, PREFETCH=False, RELOAD=False, HALF_PARTIALS=False, APART=True),
    # a sequence's rows past int32 offsets (WIDE_ROWS, decode.wide_rows: the rows in int64), causal
    "bf16-whole-causal-sink-apart-wide-rows": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, SPLIT=False,
                                                   APPLY_SINK=True, BLOCK_H=64, BLOCK_N=64, F16=False,
                                                   PREFETCH=False, RELOAD=False, HALF_PARTIALS=False, APART=True,
                                                   WHOLE=True, WIDE_ROWS=True),
    "fp8-f16-hw-causal-split-half-wide-rows": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, SPLIT=True,
                                                   APPLY_SINK=False, BLOCK_H=16, BLOCK_N=32, F16=True, PREFETCH=True,
                                                   RELOAD=False, HALF_PARTIALS=True, WIDE_ROWS=True),
    "fp8-f16-hw-causal-apart": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, SPLIT=False, APPLY_SINK=False,
                                    BLOCK_H=64, BLOCK_N=32, F16=True, PREFETCH=False, RELOAD=False,
                                    HALF_PARTIALS=False, APART=True),
}
DENSE_BALANCED = {
    "bf16": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, BLOCK_H=16, BLOCK_N=64, METADATA_FIELDS=8, F16=False,
                 PREFETCH=False, RELOAD=False),
    "fp8-hw-causal": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, BLOCK_H=64, BLOCK_N=64, METADATA_FIELDS=8,
                          F16=False, PREFETCH=False, RELOAD=False),
    "fp8-integer": dict(IS_FP8=True, HW_FP8=False, CAUSAL=False, BLOCK_H=32, BLOCK_N=32, METADATA_FIELDS=8,
                        F16=False, PREFETCH=False, RELOAD=False),
    "fp8-f16-hw": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, BLOCK_H=16, BLOCK_N=64, METADATA_FIELDS=8, F16=True,
                       PREFETCH=False, RELOAD=False),
    "fp8-hw-prefetch": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, BLOCK_H=16, BLOCK_N=32, METADATA_FIELDS=8,
                            F16=True, PREFETCH=True, RELOAD=False),
    "fp8-f16-hw-reload": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, BLOCK_H=16, BLOCK_N=32, METADATA_FIELDS=8,
                              F16=True, PREFETCH=False, RELOAD=True),
    "bf16-causal-apart": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, BLOCK_H=64, BLOCK_N=64, METADATA_FIELDS=8,
                              F16=False, PREFETCH=False, RELOAD=False, APART=True),
    "bf16-whole-apart": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, BLOCK_H=64, BLOCK_N=32, METADATA_FIELDS=8,
                             F16=False, PREFETCH=False, RELOAD=False, APART=True, WHOLE=True),
    "bf16-causal-apart-wide-rows": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, BLOCK_H=64, BLOCK_N=64,
                                        METADATA_FIELDS=8, F16=False, PREFETCH=False, RELOAD=False, APART=True,
                                        WIDE_ROWS=True),
}
COMBINE = {"plain": dict(VARIABLE=False, SPLIT_CHUNK=16, APPLY_SINK=False, HALF_PARTIALS=False, COLUMNS=512),
           "sink-half": dict(VARIABLE=False, SPLIT_CHUNK=16, APPLY_SINK=True, HALF_PARTIALS=True, COLUMNS=512),
           # few rows: each in four column parts, 64 splits a step (two splits go to _combine_few_kernel since stop 61)
           "parts-half": dict(VARIABLE=False, SPLIT_CHUNK=64, APPLY_SINK=False, HALF_PARTIALS=True, COLUMNS=128),
           "variable": dict(VARIABLE=True, SPLIT_CHUNK=16, APPLY_SINK=False, HALF_PARTIALS=False, COLUMNS=512),
           # the balanced schedule's (the uniform one gives more than 65535 sequences one split: no combine)
           "variable-wide": dict(VARIABLE=True, SPLIT_CHUNK=16, APPLY_SINK=False, HALF_PARTIALS=False, COLUMNS=512,
                                 WIDE_BATCH=True)}
SPARSE_DECODE = {
    "bf16": dict(SPLIT=False, IS_FP8=False, HW_FP8=False, HAS_TOPK_LENGTH=False, HAS_EXTRA=False,
                 HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=16, BLOCK_N=64, LOOKAHEAD=False,
                 HALF_PARTIALS=False),
    "fp8-hw-extra-sink-half": dict(SPLIT=True, IS_FP8=True, HW_FP8=True, HAS_TOPK_LENGTH=True, HAS_EXTRA=True,
                                   HAS_EXTRA_TOPK_LENGTH=True, APPLY_SINK=True, BLOCK_H=64, BLOCK_N=64,
                                   LOOKAHEAD=False, HALF_PARTIALS=True),
    "fp8-integer-extra": dict(SPLIT=True, IS_FP8=True, HW_FP8=False, HAS_TOPK_LENGTH=False, HAS_EXTRA=True,
                              HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=32, BLOCK_N=64, LOOKAHEAD=False,
                              HALF_PARTIALS=False),
    "fp8-hw-lookahead-extra": dict(SPLIT=True, IS_FP8=True, HW_FP8=True, HAS_TOPK_LENGTH=True, HAS_EXTRA=True,
                                   HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=64, BLOCK_N=32,
                                   LOOKAHEAD=True, HALF_PARTIALS=False),
    "fp8-hw-lookahead-extra-apart": dict(SPLIT=True, IS_FP8=True, HW_FP8=True, HAS_TOPK_LENGTH=True, HAS_EXTRA=True,
                                         HAS_EXTRA_TOPK_LENGTH=True, APPLY_SINK=True, BLOCK_H=64, BLOCK_N=64,
                                         LOOKAHEAD=True, HALF_PARTIALS=False, APART=True),
    "bf16-apart": dict(SPLIT=False, IS_FP8=False, HW_FP8=False, HAS_TOPK_LENGTH=False, HAS_EXTRA=False,
                       HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=64, BLOCK_N=64, LOOKAHEAD=False,
                       HALF_PARTIALS=False, APART=True),
}
SPARSE_PREFILL = {
    "plain": dict(HAS_TOPK_LENGTH=False, HAS_INDEXER=False, APPLY_SINK=False, BLOCK_H=64, BLOCK_N=64),
    "topk-length-indexer-sink": dict(HAS_TOPK_LENGTH=True, HAS_INDEXER=True, APPLY_SINK=True, BLOCK_H=16, BLOCK_N=64),
    "indexer-apart": dict(HAS_TOPK_LENGTH=True, HAS_INDEXER=True, APPLY_SINK=False, BLOCK_H=64, BLOCK_N=64,
                          APART=True),
}
KV_CACHE_WRITE = {
    "bf16-slots": dict(HAS_SLOTS=True, IS_FP8=False, HW_FP8=False),
    "fp8-hw": dict(HAS_SLOTS=False, IS_FP8=True, HW_FP8=True),
    "fp8-integer-slots": dict(HAS_SLOTS=True, IS_FP8=True, HW_FP8=False),
}
INDEX_CACHE_WRITE = {
    "bf16": dict(IS_FP8=False, HW_FP8=False, D_I=128, BLOCK=128),
    "fp8-hw": dict(IS_FP8=True, HW_FP8=True, D_I=128, BLOCK=128),
    "fp8-integer-d100": dict(IS_FP8=True, HW_FP8=False, D_I=100, BLOCK=128),
}
def _logits(paged, q_fp8, k_fp8, k_scaled, hw_fp8, block_q, h_pad, block_n, f16=False, fp8_mma=False):
    return dict(PAGED=paged, Q_FP8=q_fp8, K_FP8=k_fp8, K_SCALED=k_scaled, HW_FP8=hw_fp8, BLOCK_Q=block_q, H_PAD=h_pad,
                BLOCK_N=block_n, D_I=128, F16=f16, FP8_MMA=fp8_mma)


# Prefill widens FP8 keys before the launch (K_FP8 False, K_SCALED True), paged FP8 keys are converted in the kernel;
# FP8 q and keys with hardware conversion take f16 MMAs (F16), or with FP8_MMA (opt-in) e4m3 MMAs
INDEXER_LOGITS = {
    "bf16-prefill": _logits(False, False, False, False, False, 4, 64, 64),  # prefill's default tiles
    "fp8-hw-prefill-f16": _logits(False, True, False, True, True, 4, 64, 128, True),
    "fp8-integer-prefill": _logits(False, True, False, True, False, 2, 64, 64),
    "fp8-hw-paged-f16": _logits(True, True, True, True, True, 1, 64, 64, True),
    "fp8-integer-paged": _logits(True, True, True, True, False, 2, 64, 64),
    "bf16-q-fp8-cache-paged": _logits(True, False, True, True, True, 1, 16, 128),
    "bf16-paged": _logits(True, False, False, False, False, 1, 64, 128),
    "fp8-mma-prefill": _logits(False, True, True, True, True, 2, 64, 64, True, True),
    "fp8-mma-paged": _logits(True, True, True, True, True, 1, 64, 64, True, True),
    "fp8-hw-paged-f16-wide": dict(_logits(True, True, True, True, True, 1, 64, 64, True), WIDE_BATCH=True),
}
# The combine of at most eight splits: two (four rows a program), eight with a sink and f16 partials (one row)
COMBINE_FEW = {"two-splits": dict(SPLITS=2, ROWS=4, APPLY_SINK=False, COLUMNS=512, HALF_PARTIALS=False),
               "eight-sink-half": dict(SPLITS=8, ROWS=1, APPLY_SINK=True, COLUMNS=512, HALF_PARTIALS=True),
               "wide": dict(SPLITS=4, ROWS=2, APPLY_SINK=False, COLUMNS=512, HALF_PARTIALS=False, WIDE_BATCH=True)}
# The routed experts' two GEMV kernels at the tiles they launch with
MOE_GATE_UP = {"bf16": dict(BLOCK_N=triton_moe.GATE_UP_BLOCK_N, BLOCK_K=triton_moe.GATE_UP_BLOCK_K)}
MOE_DOWN = {"bf16": dict(BLOCK_N=triton_moe.DOWN_BLOCK_N, BLOCK_K=triton_moe.DOWN_BLOCK_K)}
KERNELS = {
    "kv_cache._store_kv_rows_kernel": KV_CACHE_WRITE,
    "kv_cache._store_index_rows_kernel": INDEX_CACHE_WRITE,
    "indexer._indexer_logits_kernel": INDEXER_LOGITS,
    "decode._dense_decode_split_kernel": DENSE,
    "decode._dense_decode_balanced_kernel": DENSE_BALANCED,
    "decode._combine_kernel": COMBINE,
    "decode._combine_few_kernel": COMBINE_FEW,
    "sparse._sparse_decode_split_kernel": SPARSE_DECODE,
    "sparse._sparse_prefill_kernel": SPARSE_PREFILL,
    "moe._gate_up_kernel": MOE_GATE_UP,
    "moe._down_kernel": MOE_DOWN,
}
ARCHS = (90, 80)  # every variant
SPOT_ARCHS = (89, 100, 120, "gfx942", "gfx90a")  # one variant per kernel; AMD GPUs by their gfx names

COMPILER = r'''
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashmla_ops.triton import decode, indexer, kv_cache, moe, sparse


def ptxas(arch):
    """The ptxas Triton assembles `arch` with (Triton 3.9 takes its CUDA 13 one for sm_90: the other stops at the
    PTX's version)."""
    from triton.backends.nvidia.compiler import get_ptxas
    try:
        return get_ptxas(arch).path
    except TypeError:  # Triton before 3.5 takes no arch
        return get_ptxas().path

POINTERS = {"Q": "*bf16", "Out": "*bf16", "BlockTable": "*i32", "Seqlens": "*i32", "Indices": "*i32",
            "TopkLength": "*i32", "ExtraIndices": "*i32", "ExtraTopkLength": "*i32", "Latent": "*bf16",
            "Rope": "*bf16", "Keys": "*bf16", "Slots": "*i32", "KStart": "*i32", "KEnd": "*i32",
            "Metadata": "*i32", "SplitOffsets": "*i32"}
KERNEL_POINTERS = {"_indexer_logits_kernel": {"Out": "*fp32", "K": "*bf16"},
                   "_gate_up_kernel": {"X": "*bf16", "W": "*bf16", "Experts": "*i64"},  # H: float32
                   "_down_kernel": {"W": "*bf16", "Experts": "*i64"}}  # H, Weights: float32
F16_POINTERS = {"_indexer_logits_kernel": {"K": "*fp16"}}  # prefill keys widened to f16 (F16 without K_FP8)
DIMS = {"PAGE": 64, "D_NOPE": 512, "D_ROPE": 64, "TILE": 128, "D_V": 512, "LSE_CHUNK": 128, "INTERPRET": False,
        "APART": False, "LOOKAHEAD": False}  # the defaults of those a kernel takes (APART: variants named -apart)
SCALARS = {"M", "H_Q", "S_Q", "S_KV", "TOPK", "EXTRA_TOPK", "H_I", "NUM_KEYS", "TOP_K", "NUM_EXPERTS", "INTER",
           "HIDDEN"}  # upper-case sizes; other capitalised names are pointers
def compile_kernel(name, constexprs, arch, options, specialize=True):  # arch: an sm_XY's XY, or an AMD gfx name
    kernel = eval(name)
    constexprs = {**{k: v for k, v in DIMS.items() if k in kernel.arg_names}, **constexprs}
    signature, attrs = {}, {}
    pointers = {**POINTERS, **KERNEL_POINTERS.get(name.split(".")[-1], {}),
                **(F16_POINTERS.get(name.split(".")[-1], {}) if constexprs.get("F16") else {}),
                **({"OutPartial": "*fp16"} if constexprs.get("HALF_PARTIALS") else {})}
    for index, (arg, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        if param.is_constexpr:
            signature[arg] = "constexpr"
        elif arg in ("KV", "ExtraKV", "Cache"):  # the FP8 cache is addressed in bytes
            signature[arg] = "*u8" if constexprs.get("IS_FP8") else "*bf16"
        elif (arg, True) in (("Q", constexprs.get("Q_FP8")), ("K", constexprs.get("K_FP8"))):  # FP8 q / k: bytes
            signature[arg] = "*u8"
        elif arg[0].isupper() and arg not in SCALARS:
            signature[arg] = pointers.get(arg, "*fp32")
        else:
            signature[arg] = "fp32" if arg == "sm_scale_log2" else "i32"
        # What the JIT specializes on at a typical launch from the ops: torch's allocations are 16-byte aligned and
        # the strides of 576-, 656- and 512-wide rows are multiples of 16 (others, a block table's or topk's, often
        # are not, and small ints are not marked: those only lose specialization). Without it no load is vectorised,
        # so none is pipelined: the kernels would compile unlike what launches.
        if specialize and (signature[arg].startswith("*") or arg.startswith("stride")):
            attrs[(index,)] = [["tt.divisibility", 16]]
    target = GPUTarget("hip", arch, 64) if isinstance(arch, str) else GPUTarget("cuda", arch, 32)
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                          target=target, options=options)


def trap_only(compiled):
    """Whether the kernel's body is just a trap: what Triton emits where it cannot lay a kernel out (sm_100: more
    tensor memory than the SM has), leaving the refusal to the load (OutOfResources)."""
    body = compiled.asm["llir"].split("\ndefine ", 1)[1].split("{\n", 1)[1].split("\n}", 1)[0]
    return "@llvm.trap()" in body and len(body.strip().splitlines()) <= 2


results = {}
for job in json.loads(sys.argv[1]):
    try:
        if "ladder" in job:  # the first config whose kernel fits, and what each took
            steps = []  # specialized or not, whichever takes more: a launch may be either
            for step in job["ladder"]:
                kernels = [compile_kernel(job["kernel"], step["constexprs"], job["arch"], step["options"], specialize)
                           for specialize in (True, False)]
                steps.append(dict(shared=max(k.metadata.shared for k in kernels),
                                  tmem=max(getattr(k.metadata, "tmem_size", None) or 0 for k in kernels),
                                  trap=any(trap_only(k) for k in kernels)))
                if (steps[-1]["shared"] <= job["limit"] and steps[-1]["tmem"] <= job["tmem_limit"]
                        and not steps[-1]["trap"]):
                    break
            results[job["id"]] = steps
        elif "options" in job:  # at the launch's options: the PTX's wgmma shapes, the shared memory, and whether
            # Triton's ptxas serializes the wgmmas (its C751x remarks: each product then waits for the one before)
            compiled = compile_kernel(job["kernel"], job["constexprs"], job["arch"], job["options"])
            shapes = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", compiled.asm["ptx"])
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                ptx.write(compiled.asm["ptx"])
                ptx.flush()
                assembled = subprocess.run([ptxas(job["arch"]), f"-arch=sm_{job['arch']}a", "-v", ptx.name, "-o",
                                            os.devnull], capture_output=True, text=True)
                assert assembled.returncode == 0, assembled.stderr[-2000:]
                remarks = assembled.stderr
            results[job["id"]] = dict(shared=compiled.metadata.shared,
                                      wgmma={shape: shapes.count(shape) for shape in set(shapes)},
                                      serialized=re.findall(r"\(C75\d\d\)[^\n]*", remarks))
        else:
            compiled = compile_kernel(job["kernel"], job["constexprs"], job["arch"], {})
            binary = "hsaco" if isinstance(job["arch"], str) else "cubin"  # AMD's code object, NVIDIA's
            results[job["id"]] = ("trap only" if trap_only(compiled) else "ok") if compiled.asm[binary] \
                else f"empty {binary}"
    except Exception as error:
        results[job["id"]] = f"{type(error).__name__}: {str(error)[-2000:]}"
print(json.dumps(results))
'''


def for_arch(constexprs, arch):
    """A variant's constexprs as the ops launch them on `arch`: a hardware-FP8 variant (HW_FP8 true) takes that GPU's
    e4m3 decoding (common.fp8_conversion: on sm_89 bf16 by integer ops, stop 43), None where it has none (before
    sm_89 the integer decoding, a variant of its own). An AMD GPU (a gfx name) takes the integer decoding
    (common.hardware_fp8 under ROCm)."""
    from flashmla_ops.triton.common import FP8_INTEGER, fp8_conversion

    if not constexprs.get("HW_FP8"):
        return constexprs
    if isinstance(arch, str):
        return dict(constexprs, HW_FP8=FP8_INTEGER)
    level = fp8_conversion(divmod(arch, 10))
    return dict(constexprs, HW_FP8=level) if level else None


def arch_name(arch):
    return arch if isinstance(arch, str) else f"sm{arch}"


def cases():
    for kernel, variants in KERNELS.items():
        for name, constexprs in variants.items():
            for arch in ARCHS:
                arch_constexprs = for_arch(constexprs, arch)
                if arch_constexprs is not None:
                    yield f"{kernel}[{name}]-{arch_name(arch)}", kernel, arch_constexprs, arch
        spot = next((name for name, constexprs in variants.items() if constexprs.get("HW_FP8")), next(iter(variants)))
        # what an AMD GPU launches (common.hardware_fp8: the integer decoding): an FP8 variant without the hardware's
        amd = next((name for name, constexprs in variants.items()
                    if (constexprs.get("IS_FP8") or constexprs.get("Q_FP8")) and not constexprs.get("HW_FP8")),
                   next(iter(variants)))
        for arch in SPOT_ARCHS:
            name = amd if isinstance(arch, str) else spot
            yield f"{kernel}[{name}]-{arch_name(arch)}", kernel, for_arch(variants[name], arch), arch


# Shared memory per block (opt-in) where it is less than Hopper's 227 KiB: Triton refuses a kernel that needs more
# (OutOfResources) and the op takes its next tiles (common.launch_fitting). sm_120 (consumer Blackwell) has Ada's;
# CDNA2 and CDNA3 (gfx90a, gfx942) have 64 KiB of LDS a workgroup.
SMEM_LIMITS = {80: 166912, 89: 101376, "gfx942": 65536}


def launch_step(config, lookahead=False, **variant):
    """A launch config (decode.LaunchConfig, sparse.TileConfig) as the kernel's constexprs, with the `variant`'s, and
    its launch options. `lookahead`: the kernel takes TileConfig.lookahead as its LOOKAHEAD constexpr (sparse
    decode)."""
    return dict(constexprs=dict(variant, BLOCK_H=config.block_h, BLOCK_N=config.block_n, APART=config.apart_logits,
                                **({"LOOKAHEAD": config.lookahead} if lookahead else {}),
                                **({"WHOLE": config.whole and not variant.get("IS_FP8")}
                                   if hasattr(config, "whole") else {})),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))


def ladders():
    """(id, kernel, the configs the op tries in order as constexprs and options, arch): the ops with tiles too big
    for these GPUs, at 64 query rows or heads per program (their largest tiles); and the indexer's logits, which has
    no ladder: its default tiles (bf16 prefill: 99,328 bytes on sm_89, exactly CDNA's 64 KiB on gfx942) must fit."""
    from flashmla_ops.triton import decode as triton_decode
    from flashmla_ops.triton import indexer as triton_indexer
    from flashmla_ops.triton import sparse as triton_sparse

    def steps(configs, lookahead=False, **variant):
        return [launch_step(config, lookahead, **variant) for config in configs]

    def indexer_default(paged):  # a bf16 cache or keys, 64 heads
        config = triton_indexer.default_logits_config(64, paged)
        return [dict(constexprs=_logits(paged, False, False, False, False, config.block_q, 64, config.block_n),
                     options=dict(num_warps=config.num_warps, num_stages=config.num_stages))]

    sparse_decode = dict(SPLIT=True, HAS_TOPK_LENGTH=True, HAS_EXTRA=False, HAS_EXTRA_TOPK_LENGTH=False,
                         APPLY_SINK=False, HALF_PARTIALS=False)
    # the 64-row default where shared memory is under 200 KiB: 32 keys per step
    dense_default = triton_decode.LaunchConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, programs_per_sm=1)
    families = {
        "sparse decode bf16": ("sparse._sparse_decode_split_kernel",
                               steps(triton_sparse.tile_configs(64), True, IS_FP8=False, HW_FP8=False,
                                     **sparse_decode)),
        "sparse decode fp8": ("sparse._sparse_decode_split_kernel",
                              steps(triton_sparse.tile_configs(64, fp8_decode=True), True, IS_FP8=True, HW_FP8=True,
                                    **sparse_decode)),
        "sparse prefill": ("sparse._sparse_prefill_kernel",
                           steps(triton_sparse.tile_configs(64), HAS_TOPK_LENGTH=True, HAS_INDEXER=True,
                                 APPLY_SINK=True)),
        "dense decode bf16": ("decode._dense_decode_split_kernel",
                              steps(triton_decode.fitting_configs(dense_default), IS_FP8=False, HW_FP8=False,
                                    CAUSAL=True, SPLIT=True, APPLY_SINK=True, F16=False, PREFETCH=False,
                                    RELOAD=False, HALF_PARTIALS=False)),
        "indexer logits prefill": ("indexer._indexer_logits_kernel", indexer_default(paged=False)),
        "indexer logits paged": ("indexer._indexer_logits_kernel", indexer_default(paged=True)),
    }
    for name, (kernel, ladder) in families.items():
        for arch, limit in SMEM_LIMITS.items():
            # each GPU's e4m3 decoding (Ampere's: the integer one)
            arch_ladder = [dict(step, constexprs=for_arch(step["constexprs"], arch)
                                or dict(step["constexprs"], HW_FP8=False)) for step in ladder]
            yield f"{name}-{arch_name(arch)}", kernel, arch_ladder, arch, limit


HOPPER_SHARED = 232448  # bytes per block, opt-in (227 KiB)
TENSOR_MEMORY_COLUMNS = 512  # sm_100's, which Triton checks at load


def default_launches(multiprocessors, wgmma):
    """(name, kernel, the op's tiles in the order it tries them, variant) on a GPU of Hopper's shared memory with
    `multiprocessors` SMs, whose products are wgmma or not (common.warpgroup_products): the dense decode of b128 h128,
    h16 and FP8 h16, the sparse FP8 and BF16 decode and the sparse prefill from 64 heads."""
    from unittest import mock

    from flashmla_ops.triton import decode as triton_decode
    from flashmla_ops.triton import sparse as triton_sparse

    with mock.patch.object(triton_decode, "device_limits", lambda device: (multiprocessors, HOPPER_SHARED)), \
            mock.patch.object(triton_decode, "warpgroup_products", lambda device: wgmma):
        dense, dense_h16, dense_fp8 = (triton_decode.default_config(128, 128, None),
                                       triton_decode.default_config(128, 16, None),
                                       triton_decode.default_config(128, 16, None, is_fp8=True))
    dense_bf16 = dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, SPLIT=True, APPLY_SINK=False, F16=False,
                      PREFETCH=False, RELOAD=False, HALF_PARTIALS=False)
    sparse_decode = dict(SPLIT=True, HAS_TOPK_LENGTH=False, HAS_EXTRA=False, HAS_EXTRA_TOPK_LENGTH=False,
                         APPLY_SINK=False, HALF_PARTIALS=False)
    fitting = triton_decode.fitting_configs
    return [
        ("dense decode bf16", "decode._dense_decode_split_kernel", fitting(dense), dense_bf16),
        ("dense decode bf16 h16", "decode._dense_decode_split_kernel", fitting(dense_h16), dense_bf16),
        ("dense decode fp8 h16", "decode._dense_decode_split_kernel", fitting(dense_fp8),
         dict(dense_bf16, IS_FP8=True, HW_FP8=2, F16=dense_fp8.fp8_f16, PREFETCH=dense_fp8.prefetch)),
        ("sparse decode fp8", "sparse._sparse_decode_split_kernel",
         triton_sparse.tile_configs(128, fp8_decode=True, apart=wgmma), dict(sparse_decode, IS_FP8=True, HW_FP8=2)),
        ("sparse decode bf16", "sparse._sparse_decode_split_kernel", triton_sparse.tile_configs(64, apart=wgmma),
         dict(sparse_decode, IS_FP8=False, HW_FP8=False)),
        ("sparse prefill", "sparse._sparse_prefill_kernel", triton_sparse.tile_configs(128, apart=wgmma, prefill=True),
         dict(HAS_TOPK_LENGTH=False, HAS_INDEXER=False, APPLY_SINK=False)),
    ]


def hopper_defaults():
    """(id, kernel, constexprs, options) of the 64-row tiles the ops take by default on an H100 (132 SMs, Hopper's
    shared memory, wgmma), each with APART as the default has it (`-default`) and flipped (`-flipped`)."""
    import dataclasses

    for name, kernel, configs, variant in default_launches(132, wgmma=True):
        if configs[0].block_h < 64:
            continue
        flipped = dataclasses.replace(configs[0], apart_logits=not configs[0].apart_logits)
        for which, launch in (("default", configs[0]), ("flipped", flipped)):
            step = launch_step(launch, kernel == "sparse._sparse_decode_split_kernel", **variant)
            yield f"{name}-{which}", kernel, step["constexprs"], step["options"]


def blackwell_ladders():
    """(id, kernel, ladder, arch, limit) as ladders() has them, of the ops on a B200 (sm_100, 148 SMs, Hopper's shared
    memory, 512 columns of tensor memory; its products are tcgen05's, not wgmma: whether the logits are masked apart is
    common.warpgroup_products' call on an sm_100, its uncached function with the GPU faked). The csrc kernels are
    sm_90a code, so there these are the fast path."""
    from unittest import mock

    import torch

    from flashmla_ops.triton import common

    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: (10, 0)):
        wgmma = common.warpgroup_products.__wrapped__(torch.device("cuda"))
    for name, kernel, configs, variant in default_launches(148, wgmma):
        ladder = [launch_step(config, kernel == "sparse._sparse_decode_split_kernel", **variant) for config in configs]
        yield f"{name}-sm100", kernel, ladder, 100, HOPPER_SHARED


# On a B200 the dense decode's 64-row tiles need 576 columns of tensor memory (P V's 64 x 512 accumulator and the
# logits' 64): Triton compiles them to a trap, refuses them at load (OutOfResources) and the op takes its 32-row
# tiles (mma.sync, no tensor memory). Every other op runs its first tiles there.
BLACKWELL_FALLS_BACK = {"dense decode bf16-sm100"}


@pytest.fixture(scope="module")
def compiled():
    jobs = [dict(id=case_id, kernel=kernel, constexprs=constexprs, arch=arch)
            for case_id, kernel, constexprs, arch in cases()]
    jobs += [dict(id=case_id, kernel=kernel, ladder=ladder, arch=arch, limit=limit, tmem_limit=TENSOR_MEMORY_COLUMNS)
             for case_id, kernel, ladder, arch, limit in (*ladders(), *blackwell_ladders())]
    jobs += [dict(id=case_id, kernel=kernel, constexprs=constexprs, arch=90, options=options)
             for case_id, kernel, constexprs, options in hopper_defaults()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(1, min(cores, 8))  # one compiler process per core, the jobs dealt out
    running = [subprocess.Popen([sys.executable, "-c", COMPILER, json.dumps(jobs[worker::workers])],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for worker in range(workers)]
    results = {}
    try:
        for process in running:
            stdout, stderr = process.communicate(timeout=1200)
            assert process.returncode == 0, stderr[-4000:]
            results.update(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in running:
            process.kill()  # a no-op for those that ended; the rest would outlive a failed or timed-out test
    return results


@pytest.mark.parametrize("case_id", [case[0] for case in cases()])
def test_triton_kernel_compiles(compiled, case_id):
    assert compiled[case_id] == "ok", compiled[case_id]


@pytest.mark.parametrize("case_id", [case[0] for case in ladders()])
def test_every_op_finds_tiles_that_fit_below_hopper(compiled, case_id):
    """Compiled for Ampere (163 KiB per block), Ada / consumer Blackwell (99 KiB) and CDNA3 (64 KiB), each op's ladder
    of tiles reaches one whose kernel fits: launch_fitting will find it there (the indexer's one default, itself)."""
    limit = dict((case[0], case[4]) for case in ladders())[case_id]
    assert_fits(compiled[case_id], limit)


def assert_fits(steps, limit):
    """The ladder's last compiled step (the compiler stops at the first that fits) fits `limit` bytes of shared
    memory and the tensor memory, and is not a trap."""
    assert isinstance(steps, list), steps
    last = steps[-1]
    assert last["shared"] <= limit and last["tmem"] <= TENSOR_MEMORY_COLUMNS and not last["trap"], \
        f"no config fits {limit}: {steps}"


@pytest.mark.parametrize("family", sorted({case[0].rsplit("-", 1)[0] for case in hopper_defaults()}))
def test_hopper_defaults_compute_the_logits_once_and_fit(compiled, family):
    """Compiled for sm_90 at the launch's options, each op's default 64-row tiles on Hopper mask their logits apart
    (common.mask_logits_apart): the two warpgroups split the logits' products (m64n32k16 wgmmas, 36 a tile) where
    without it both compute all of them (72), P V's products the same, and the tiles fit Hopper's shared memory. And
    ptxas does not serialize the default's wgmmas (its C751x remarks)."""
    default, flipped = compiled[f"{family}-default"], compiled[f"{family}-flipped"]
    assert isinstance(default, dict) and isinstance(flipped, dict), (default, flipped)
    assert not default.pop("serialized"), default  # (stop 57: the dense decode's split launches were, C7515)
    flipped.pop("serialized")
    logits = default["wgmma"].pop("m64n32k16")
    assert (logits, flipped["wgmma"].pop("m64n32k16")) == (36, 72)
    assert default["wgmma"] == flipped["wgmma"] and default["wgmma"], (default, flipped)  # P V's
    assert default["shared"] <= HOPPER_SHARED, default


@pytest.mark.parametrize("case_id", [case[0] for case in blackwell_ladders()])
def test_blackwell_takes_each_ops_first_tiles_but_the_dense_decodes_64_rows(compiled, case_id):
    """Compiled for sm_100 at the launch's options, each op's first tiles fit a B200 (shared memory, tensor memory, no
    trap), but the dense decode's 64-row tiles, whose ladder reaches its 32-row ones (BLACKWELL_FALLS_BACK)."""
    steps = compiled[case_id]
    assert_fits(steps, HOPPER_SHARED)
    assert (len(steps) > 1) == (case_id in BLACKWELL_FALLS_BACK), steps
