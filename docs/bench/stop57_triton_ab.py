"""Stop 57: the Triton SPEC rows under a few launch configurations, each checked against the reference op first.

Compiled for sm_90 here (Triton 3.6, docs/bench/triton_asm.py), the Triton kernels of 64-row tiles at 64 tokens a step
and two stages wait at the top of every step for the copies the step before issued at its end (`DEPBAR.LE SB0, 0x0`):
no load overlaps a product. 32 tokens a step at three or four stages keep one or two steps of loads in flight and fit
(188 / 225 KiB). And the dense decode's split launches (SPLIT) had every wgmma serialized by ptxas (C7515: the loop's
zero-trip path set the accumulators), which `tl.assume` on a loop of at least one step removes. Rows and configs:
- dense bf16 rows of 64-row tiles: `main` (the module as committed before this stop: `git show
  0f32bb3:flashmla_ops/triton/decode.py > flashmla_ops/triton/_main_decode.py` before the call, not committed),
  `default` (this tree's), `whole` (the latent as one 512-wide tile,
  LaunchConfig.whole) at 64 x 64 two stages and 64 x 32 three;
- sparse FP8 decode and sparse prefill: the default, and 64 x 32 at three and four stages.
`python docs/bench/stop57_triton_ab.py [--rows SUBSTR,...]` from the repository root, PYTHONPATH=$PWD:$PWD/scripts.
"""
import argparse
import dataclasses
import sys

import torch

import bench_decode
import bench_sparse
from bench_decode import D_QK, KV_LORA_RANK, decode_op, forced_backend, make_inputs, time_ms

from flashmla_ops.triton import decode as triton_decode
from flashmla_ops.triton import sparse as triton_sparse


def error(out, reference):
    """max |out - reference| over max |reference| (NaN anywhere: inf)."""
    out, reference = out.float(), reference.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def dense_rows(device, chosen):
    main_decode = None
    try:
        from flashmla_ops.triton import _main_decode as main_decode
    except ImportError:
        print("no flashmla_ops/triton/_main_decode.py: main's kernel not timed")
    # batch 1 first: its split launch is the one the serialization hit
    for name, batch, s_q, h_q, seqlen, is_fp8, _, target in sorted(bench_decode.SPEC_ROWS, key=lambda row: row[1]):
        if is_fp8 or s_q * h_q < 64 or not chosen(name):
            continue
        sets, seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, False, device, copies=2)
        with forced_backend("reference"):
            reference = decode_op(seqlens, s_q, False)(*sets[0])[0]
        default = triton_decode.default_config(batch, s_q * h_q, device)
        whole = dataclasses.replace(default, whole=True)
        configs = [("default", triton_decode, default), ("whole 64x64 s2", triton_decode, whole),
                   ("whole 64x32 s3", triton_decode, dataclasses.replace(whole, block_n=32, num_stages=3))]
        if main_decode is not None:
            main_default = main_decode.default_config(batch, s_q * h_q, device)
            configs.insert(0, ("main", main_decode, main_default))
        flops = bench_decode.decode_flops(batch, s_q, h_q, seqlen)
        for label, module, config in configs:
            def op(q, cache, block_table, module=module, config=config):
                return module.dense_decode(q, cache, block_table, seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1,
                                           False, None, config)
            report(name, label, config, lambda: error(op(*sets[0])[0], reference), lambda: time_ms(op, sets),
                   flops, target)
        torch.cuda.empty_cache()


def sparse_rows(device, chosen):
    for name, op_name, size, second, h_q, topk, _, target in bench_sparse.SPEC_ROWS:
        if not chosen(name):
            continue
        decode = op_name == "decode"
        make, run, queries, _ = bench_sparse.row_op(op_name, size, second, h_q, topk, decode, device)
        sets = [make() for _ in range(2 if decode else 1)]
        # prefill: checked on its first 256 queries (the reference gathers every row of every query)
        check = sets[0] if decode else (sets[0][0][:256], sets[0][1], sets[0][2][:256])
        with forced_backend("reference"):
            reference = run(*check)[0]
        apart = triton_sparse.warpgroup_products(device)
        default = triton_sparse.tile_configs(h_q, fp8_decode=decode, apart=apart, prefill=not decode)[0]
        configs = [("default", default),
                   ("64x32 s3", dataclasses.replace(default, block_n=32, num_stages=3)),
                   ("64x32 s4", dataclasses.replace(default, block_n=32, num_stages=4))]
        for label, config in configs:
            op = bench_sparse.triton_run(op_name, config)
            report(name, label, config, lambda: error(op(*check)[0], reference), lambda: time_ms(op, sets),
                   bench_sparse.attention_flops(queries, h_q, topk), (target, "TFLOP/s"))
        torch.cuda.empty_cache()


def report(name, label, config, measure_error, measure_ms, flops, target):
    try:
        err = measure_error()
        ms = measure_ms()
    except Exception as exc:  # a config the GPU cannot run (shared memory)
        print(f"{name:36} {label:16} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        return
    tflop_s = flops / ms / 1e9
    fraction = f"{tflop_s / target[0]:.2f}" if target[1] == "TFLOP/s" else "-"
    print(f"{name:36} {label:16} {ms * 1e3:9.1f} us {tflop_s:6.1f} TFLOP/s ({fraction}) err {err:.2e} {config}"
          f"{bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="")
    parser.add_argument("--settle", type=float, default=3.0)
    args = parser.parse_args()
    bench_decode.SETTLE_S = args.settle
    chosen = bench_decode.row_filter(args.rows)
    device = torch.device("cuda")
    torch.manual_seed(0)
    dense_rows(device, chosen)
    sparse_rows(device, chosen)


if __name__ == "__main__":
    sys.exit(main())
