"""Stop 60, for the next device session: the Triton split launches of two splits with f16 partials
(decode.HALF_PARTIALS_FROM_SPLITS 2, against main's 8: half the bytes written and read back by the combine, since
stop 59's combine reads them in one pass; stop 42 had found them slower at two splits, with the two-pass combine),
and the sparse FP8 decode b64 h64 (the SPEC row, two splits of 128 programs on 132 SMs) at three and four splits.
The whole op, CUDA-graph replays (bench_decode.time_ms), each side checked against the reference op first; sides
alternate by round (in order, then reversed) in one process.
`python docs/bench/stop60_partials_ab.py [--rounds N]` from the repository root, PYTHONPATH=$PWD:$PWD/scripts.
"""
import argparse
import sys

import torch

import bench_decode
from bench_decode import D_QK, KV_LORA_RANK, decode_flops, make_inputs, time_ms
from bench_sparse import attention_flops, decode_inputs

from flashmla_ops import reference
from flashmla_ops.triton import decode as triton_decode
from flashmla_ops.triton import sparse as triton_sparse

MODEL_SPLITS = triton_sparse.num_splits_for
MAIN_HALF_FROM = triton_decode.HALF_PARTIALS_FROM_SPLITS


def side(half_from=MAIN_HALF_FROM, sparse_splits=None):
    """Sets the partials' f16 threshold and (sparse_splits) the sparse decode's split count."""
    def setup():
        triton_decode.HALF_PARTIALS_FROM_SPLITS = half_from
        triton_sparse.num_splits_for = (MODEL_SPLITS if sparse_splits is None
                                        else lambda programs, key_tiles, multiprocessors: sparse_splits)
    return setup


DENSE_SIDES = [("main", side()), ("f16 at 2", side(half_from=2))]
SPARSE_SIDES = DENSE_SIDES + [("3 splits", side(sparse_splits=3)), ("4 splits", side(sparse_splits=4)),
                              ("4 splits f16", side(half_from=2, sparse_splits=4))]
# (name, batch, s_q, h_q, seqlen, is_fp8): the dense SPEC rows of two splits
DENSE_ROWS = [("dense bf16 b128 h16 4k", 128, 1, 16, 4096, False),
              ("dense bf16 b128 h16 16k", 128, 1, 16, 16384, False),
              ("dense fp8 b128 h16 16k", 128, 1, 16, 16384, True)]


def error(out, want):
    out, want = out.float(), want.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def run_rounds(name, sides, rounds, op, sets, want, flops):
    times = {label: [] for label, _ in sides}
    for round_ in range(rounds):
        for label, setup in sides if round_ % 2 == 0 else sides[::-1]:
            setup()
            err = error(op(*sets[0])[0], want)
            us = time_ms(op, sets) * 1e3
            times[label].append(us)
            print(f"{name:28} {label:13} {us:8.1f} us {flops / us / 1e6:7.1f} TFLOP/s, err {err:.2e}"
                  f"{bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)
    side()()
    for label, values in times.items():
        print(f"{name:28} {label:13}: " + ", ".join(f"{v:.1f}" for v in values) + " us", flush=True)


def dense_row(name, batch, s_q, h_q, seqlen, is_fp8, device, rounds, sides=None):
    sets, seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, copies=2)

    def op(q, cache, block_table):
        return triton_decode.dense_decode(q, cache, block_table, seqlens, KV_LORA_RANK, D_QK ** -0.5, False, is_fp8,
                                          None, None)
    want = reference.dense_decode(*sets[0], seqlens, KV_LORA_RANK, D_QK ** -0.5, False, is_fp8)[0]
    run_rounds(name, sides or DENSE_SIDES, rounds, op, sets, want, decode_flops(batch, s_q, h_q, seqlen))


def sparse_row(device, rounds, sides=None):
    batch, h_q, topk, scale = 64, 64, 2048, D_QK ** -0.5
    sets = [decode_inputs(batch, 1, h_q, topk, True, device) for _ in range(2)]

    def op(q, cache, indices):
        return triton_sparse.sparse_decode(q, cache, indices, None, None, None, None, KV_LORA_RANK, scale, True)
    want = reference.sparse_decode(*sets[0], None, None, None, None, KV_LORA_RANK, scale, True)[0]
    run_rounds("sparse fp8 b64 h64 topk2048", sides or SPARSE_SIDES, rounds, op, sets, want,
               attention_flops(batch, h_q, topk))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    bench_decode.SETTLE_S = args.settle
    device = torch.device(args.device)
    torch.manual_seed(0)
    sparse_row(device, args.rounds)
    if args.dense:
        for row in DENSE_ROWS:
            dense_row(*row, device, args.rounds)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
