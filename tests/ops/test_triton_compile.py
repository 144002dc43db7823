"""Every Triton kernel compiles for the GPUs it targets, on any machine: every constexpr variant for sm_90 (Hopper) and
sm_80 (Ampere), and one variant of each kernel (its hardware-FP8 one where it has one) for sm_89 (Ada) and sm_120
(consumer Blackwell), which keeps the test's time in CI to about two minutes more than the first two alone.

Triton compiles to a cubin without a GPU; this catches what the CPU interpreter cannot (type inference across
branches, layouts, register and shared-memory limits) over each kernel's constexpr variants. The compiles run in one
subprocess without TRITON_INTERPRET (the test session may have it set, which turns the kernels into interpreted
functions).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

DENSE = {
    "bf16": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, SPLIT=False, APPLY_SINK=False, BLOCK_H=16, BLOCK_N=64),
    "bf16-causal-split-sink": dict(IS_FP8=False, HW_FP8=False, CAUSAL=True, SPLIT=True, APPLY_SINK=True, BLOCK_H=64,
                                   BLOCK_N=64),
    "fp8-hw-split": dict(IS_FP8=True, HW_FP8=True, CAUSAL=False, SPLIT=True, APPLY_SINK=False, BLOCK_H=32,
                         BLOCK_N=64),
    "fp8-integer-causal-sink": dict(IS_FP8=True, HW_FP8=False, CAUSAL=True, SPLIT=False, APPLY_SINK=True, BLOCK_H=16,
                                    BLOCK_N=32),
}
DENSE_BALANCED = {
    "bf16": dict(IS_FP8=False, HW_FP8=False, CAUSAL=False, BLOCK_H=16, BLOCK_N=64, METADATA_FIELDS=8),
    "fp8-hw-causal": dict(IS_FP8=True, HW_FP8=True, CAUSAL=True, BLOCK_H=64, BLOCK_N=64, METADATA_FIELDS=8),
    "fp8-integer": dict(IS_FP8=True, HW_FP8=False, CAUSAL=False, BLOCK_H=32, BLOCK_N=32, METADATA_FIELDS=8),
}
COMBINE = {"plain": dict(VARIABLE=False, SPLIT_CHUNK=16, APPLY_SINK=False),
           "sink": dict(VARIABLE=False, SPLIT_CHUNK=16, APPLY_SINK=True),
           "variable": dict(VARIABLE=True, SPLIT_CHUNK=16, APPLY_SINK=False)}
SPARSE_DECODE = {
    "bf16": dict(SPLIT=False, IS_FP8=False, HW_FP8=False, HAS_TOPK_LENGTH=False, HAS_EXTRA=False,
                 HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=16, BLOCK_N=64),
    "fp8-hw-extra-sink": dict(SPLIT=True, IS_FP8=True, HW_FP8=True, HAS_TOPK_LENGTH=True, HAS_EXTRA=True,
                              HAS_EXTRA_TOPK_LENGTH=True, APPLY_SINK=True, BLOCK_H=64, BLOCK_N=64),
    "fp8-integer-extra": dict(SPLIT=True, IS_FP8=True, HW_FP8=False, HAS_TOPK_LENGTH=False, HAS_EXTRA=True,
                              HAS_EXTRA_TOPK_LENGTH=False, APPLY_SINK=False, BLOCK_H=32, BLOCK_N=64),
}
SPARSE_PREFILL = {
    "plain": dict(HAS_TOPK_LENGTH=False, HAS_INDEXER=False, APPLY_SINK=False, BLOCK_H=64, BLOCK_N=64),
    "topk-length-indexer-sink": dict(HAS_TOPK_LENGTH=True, HAS_INDEXER=True, APPLY_SINK=True, BLOCK_H=16, BLOCK_N=64),
}
KV_CACHE_WRITE = {
    "bf16-slots": dict(HAS_SLOTS=True, IS_FP8=False, HW_FP8=False),
    "fp8-hw": dict(HAS_SLOTS=False, IS_FP8=True, HW_FP8=True),
    "fp8-integer-slots": dict(HAS_SLOTS=True, IS_FP8=True, HW_FP8=False),
}
INDEXER_LOGITS = {
    "bf16-prefill": dict(PAGED=False, Q_FP8=False, K_FP8=False, HW_FP8=False, BLOCK_Q=2, H_PAD=64, BLOCK_N=64,
                         D_I=128),
    "fp8-hw-prefill": dict(PAGED=False, Q_FP8=True, K_FP8=True, HW_FP8=True, BLOCK_Q=2, H_PAD=64, BLOCK_N=64,
                           D_I=128),
    "fp8-hw-paged": dict(PAGED=True, Q_FP8=True, K_FP8=True, HW_FP8=True, BLOCK_Q=1, H_PAD=64, BLOCK_N=64, D_I=128),
    "fp8-integer-paged": dict(PAGED=True, Q_FP8=True, K_FP8=True, HW_FP8=False, BLOCK_Q=2, H_PAD=64, BLOCK_N=64,
                              D_I=128),
    "bf16-q-fp8-cache-paged": dict(PAGED=True, Q_FP8=False, K_FP8=True, HW_FP8=True, BLOCK_Q=1, H_PAD=16,
                                   BLOCK_N=64, D_I=128),
}
INDEXER_TOPK = {"flat": dict(HAS_BLOCK_TABLE=False, BLOCK=1024), "paged": dict(HAS_BLOCK_TABLE=True, BLOCK=1024)}
KERNELS = {
    "kv_cache._store_kv_rows_kernel": KV_CACHE_WRITE,
    "indexer._indexer_logits_kernel": INDEXER_LOGITS,
    "indexer._indexer_topk_kernel": INDEXER_TOPK,
    "decode._dense_decode_split_kernel": DENSE,
    "decode._dense_decode_balanced_kernel": DENSE_BALANCED,
    "decode._combine_kernel": COMBINE,
    "sparse._sparse_decode_split_kernel": SPARSE_DECODE,
    "sparse._sparse_prefill_kernel": SPARSE_PREFILL,
}
ARCHS = (90, 80)  # every variant
SPOT_ARCHS = (89, 120)  # one variant per kernel

COMPILER = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashmla_ops.triton import decode, indexer, kv_cache, sparse

POINTERS = {"Q": "*bf16", "Out": "*bf16", "BlockTable": "*i32", "Seqlens": "*i32", "Indices": "*i32",
            "TopkLength": "*i32", "ExtraIndices": "*i32", "ExtraTopkLength": "*i32", "Latent": "*bf16",
            "Rope": "*bf16", "Slots": "*i32", "KStart": "*i32", "KEnd": "*i32",
            "Metadata": "*i32", "SplitOffsets": "*i32"}
KERNEL_POINTERS = {"_indexer_logits_kernel": {"Out": "*fp32", "K": "*bf16"}, "_indexer_topk_kernel": {"Out": "*i32"}}
DIMS = {"PAGE": 64, "D_NOPE": 512, "D_ROPE": 64, "TILE": 128, "D_V": 512, "INTERPRET": False}
SCALARS = {"M", "H_Q", "S_Q", "S_KV", "TOPK", "EXTRA_TOPK", "H_I", "NUM_KEYS"}  # upper-case sizes; other capitalised names are pointers
results = {}
for job in json.loads(sys.argv[1]):
    kernel = eval(job["kernel"])
    constexprs = {**{k: v for k, v in DIMS.items() if k in kernel.arg_names}, **job["constexprs"]}
    signature = {}
    pointers = {**POINTERS, **KERNEL_POINTERS.get(job["kernel"].split(".")[-1], {})}
    for name, param in zip(kernel.arg_names, kernel.params):
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in ("KV", "ExtraKV", "Cache"):  # the FP8 cache is addressed in bytes
            signature[name] = "*u8" if constexprs.get("IS_FP8") else "*bf16"
        elif (name, True) in (("Q", constexprs.get("Q_FP8")), ("K", constexprs.get("K_FP8"))):  # FP8 q / k: bytes
            signature[name] = "*u8"
        elif name[0].isupper() and name not in SCALARS:
            signature[name] = pointers.get(name, "*fp32")
        else:
            signature[name] = "fp32" if name == "sm_scale_log2" else "i32"
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", job["arch"], 32))
        results[job["id"]] = "ok" if compiled.asm["cubin"] else "empty cubin"
    except Exception as error:
        results[job["id"]] = f"{type(error).__name__}: {str(error)[-2000:]}"
print(json.dumps(results))
'''


def cases():
    for kernel, variants in KERNELS.items():
        for name, constexprs in variants.items():
            for arch in ARCHS:
                if arch < 89 and constexprs.get("HW_FP8"):
                    continue  # hardware e4m3 conversion is only chosen on sm_89+
                yield f"{kernel}[{name}]-sm{arch}", kernel, constexprs, arch
        spot = next((name for name, constexprs in variants.items() if constexprs.get("HW_FP8")), next(iter(variants)))
        for arch in SPOT_ARCHS:
            yield f"{kernel}[{spot}]-sm{arch}", kernel, variants[spot], arch


@pytest.fixture(scope="module")
def compiled():
    jobs = [dict(id=case_id, kernel=kernel, constexprs=constexprs, arch=arch)
            for case_id, kernel, constexprs, arch in cases()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILER, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case_id", [case[0] for case in cases()])
def test_triton_kernel_compiles(compiled, case_id):
    assert compiled[case_id] == "ok", compiled[case_id]
