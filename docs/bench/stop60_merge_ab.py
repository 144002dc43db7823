"""Stop 60: the Triton sparse decode's splits merged in the kernel (sparse.MERGE_MAX_SPLITS 4: the split that finishes
last merges them) against the combine launch (MERGE_MAX_SPLITS 1), on the SPEC row that splits (FP8 b64 h64
topk2048: two splits on 132 SMs) and on rows of three and four splits: the whole op, CUDA-graph replays
(bench_decode.time_ms), each side checked against the reference op first. Sides alternate by round (in order, then
reversed) in one process. `python docs/bench/stop60_merge_ab.py [--rounds N]` from the repository root,
PYTHONPATH=$PWD:$PWD/scripts, on a tree with docs/bench/stop60_triton_sparse_merge.diff applied (`git apply`; not
kept: docs/HISTORY.md, stop 60).
"""
import argparse
import sys

import torch

import bench_decode
from bench_decode import D_QK, KV_LORA_RANK, time_ms
from bench_sparse import attention_flops, decode_inputs

from flashmla_ops import reference
from flashmla_ops.triton import sparse as triton_sparse

# (name, batch, s_q, h_q, topk, is_fp8, SPEC target TFLOP/s or None)
ROWS = [("decode fp8 b64 h64 topk2048", 64, 1, 64, 2048, True, 250),
        ("decode fp8 b40 h64 topk2048", 40, 1, 64, 2048, True, None),
        ("decode fp8 b32 h64 topk2048", 32, 1, 64, 2048, True, None),
        ("decode fp8 b16 h128 topk2048", 16, 1, 128, 2048, True, None),
        ("decode bf16 b64 h64 topk2048", 64, 1, 64, 2048, False, None)]
SIDES = [("merge", 4), ("combine", 1)]


def error(out, want):
    out, want = out.float(), want.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def row(name, batch, s_q, h_q, topk, is_fp8, target, device, rounds):
    scale = D_QK ** -0.5
    sets = [decode_inputs(batch, s_q, h_q, topk, is_fp8, device) for _ in range(2)]

    def op(q, cache, indices):
        return triton_sparse.sparse_decode(q, cache, indices, None, None, None, None, KV_LORA_RANK, scale, is_fp8)
    want = reference.sparse_decode(*sets[0], None, None, None, None, KV_LORA_RANK, scale, is_fp8)[0]
    flops = attention_flops(batch * s_q, h_q, topk)
    multiprocessors, _ = triton_sparse.device_limits(device)
    config = triton_sparse.tile_configs(h_q, fp8_decode=is_fp8, apart=triton_sparse.warpgroup_products(device))[0]
    programs = batch * s_q * -(-h_q // config.block_h)
    splits = triton_sparse.num_splits_for(programs, -(-topk // config.block_n), multiprocessors)
    times = {label: [] for label, _ in SIDES}
    for round_ in range(rounds):
        for label, merge_max in SIDES if round_ % 2 == 0 else SIDES[::-1]:
            triton_sparse.MERGE_MAX_SPLITS = merge_max
            err = error(op(*sets[0])[0], want)
            us = time_ms(op, sets) * 1e3
            times[label].append(us)
            tflops = flops / us / 1e6
            fraction = f", {tflops / target:.2f} of {target}" if target else ""
            print(f"{name} ({splits} splits) {label:8} {us:7.1f} us {tflops:6.1f} TFLOP/s{fraction}, err {err:.2e}"
                  f"{bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)
    for label, values in times.items():
        print(f"{name} ({splits} splits) {label:8}: " + ", ".join(f"{v:.1f}" for v in values) + " us", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    bench_decode.SETTLE_S = args.settle
    device = torch.device(args.device)
    torch.manual_seed(0)
    for name, batch, s_q, h_q, topk, is_fp8, target in ROWS:
        row(name, batch, s_q, h_q, topk, is_fp8, target, device, args.rounds)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
