"""Stop 59: the Triton combine in column parts (combine_parts; COMBINE_MAX_PARTS 1, 2, 4: `--parts`) and in one pass
per lane, against main's (flashmla_ops/triton/_main_decode.py: `git show HEAD:flashmla_ops/triton/decode.py >
flashmla_ops/triton/_main_decode.py` before the call, not committed; without it only this tree's sides run), on the
split SPEC rows (dense b1 h128 32k, b8 h16 32k; sparse FP8 decode b64 h64, two splits) and a few other long-context
shapes: the whole op (CUDA-graph replays, bench_decode.time_ms) and the combine alone on partials of the op's shape,
each side checked against the reference op first. Sides alternate by round (in order, then reversed) in one process.
`python docs/bench/stop59_combine_ab.py [--rounds N]` from the repository root, PYTHONPATH=$PWD:$PWD/scripts.
"""
import argparse
import sys

import torch

import bench_decode
import bench_sparse
from bench_decode import D_QK, KV_LORA_RANK, decode_op, forced_backend, make_inputs, time_ms

from flashmla_ops.triton import decode as triton_decode
from flashmla_ops.triton import sparse as triton_sparse

# (name, batch, s_q, h_q, seqlen): the two split dense SPEC rows, then shapes of few rows and many splits
ROWS = [("bf16 b1 h128 32k", 1, 1, 128, 32768), ("bf16 b8 h16 32k", 8, 1, 16, 32768),
        ("bf16 b1 h16 32k", 1, 1, 16, 32768), ("bf16 b2 h64 16k", 2, 1, 64, 16384),
        ("bf16 b1 s_q2 h128 64k", 1, 2, 128, 65536)]
PARTS = [1, 2, 4]


def error(out, reference):
    out, reference = out.float(), reference.float()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def sides():
    """(label, decode module, COMBINE_MAX_PARTS or None): main's module, then this tree's at each of PARTS."""
    found = []
    try:
        from flashmla_ops.triton import _main_decode
        found.append(("main", _main_decode, None))
    except ImportError:
        print("no flashmla_ops/triton/_main_decode.py: main's combine not timed")
    return found + [(f"parts {parts}", triton_decode, parts) for parts in PARTS]


def take(side):
    """Makes `side` the combine every op runs (the sparse decode's too) and returns its module."""
    _, module, parts = side
    if parts is not None:
        triton_decode.COMBINE_MAX_PARTS = parts
    triton_sparse.combine = module.combine
    return module


def partial_sets(batch, s_q, h_q, splits, device):
    out = torch.empty(batch, s_q, h_q, KV_LORA_RANK, dtype=torch.bfloat16, device=device)
    lse = torch.empty(batch, h_q, s_q, device=device)
    sets = []
    for _ in range(4):
        partials = triton_decode.split_buffers(out, lse, splits)
        partials.out.normal_()
        partials.lse.normal_()
        if partials.half:
            partials.scale.fill_(1.0)
        sets.append((partials,))
    return out, lse, sets


def run_rounds(name, rounds, measure):
    """measure(side) -> (op us, combine-alone us or None, error) for each side, rounds in alternating order."""
    all_sides = sides()
    times = {side[0]: [] for side in all_sides}
    for round_ in range(rounds):
        for side in all_sides if round_ % 2 == 0 else all_sides[::-1]:
            whole, alone, err = measure(side)
            times[side[0]].append((whole, alone))
            alone_text = f", combine alone {alone:6.1f} us" if alone is not None else ""
            print(f"{name:30} {side[0]:8} op {whole:7.1f} us{alone_text}, err {err:.2e}"
                  f"{bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)
    for label, pairs in times.items():
        alone_text = ("; combine " + ", ".join(f"{a:.1f}" for _, a in pairs)) if pairs[0][1] is not None else ""
        print(f"{name:30} {label:8}: op " + ", ".join(f"{w:.1f}" for w, _ in pairs) + " us" + alone_text, flush=True)


def dense_row(name, batch, s_q, h_q, seqlen, device, rounds):
    sets, seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, False, device, copies=2)
    with forced_backend("reference"):
        reference = decode_op(seqlens, s_q, False)(*sets[0])[0]
    config = triton_decode.default_config(batch, s_q * h_q, device)
    splits = triton_decode.num_splits_for(batch, -(-s_q * h_q // config.block_h), -(-seqlen // config.block_n),
                                          triton_decode.device_limits(device)[0], config.programs_per_sm)
    out, lse, combine_sets = partial_sets(batch, s_q, h_q, splits, device)

    def measure(side):
        module = take(side)

        def op(q, cache, block_table):
            return module.dense_decode(q, cache, block_table, seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1, False,
                                       None, None)

        def combine(partials):
            module.combine(partials, None, out, lse)
            return out, lse
        err = error(op(*sets[0])[0], reference)
        return time_ms(op, sets) * 1e3, time_ms(combine, combine_sets) * 1e3, err
    run_rounds(f"{name} ({splits} splits)", rounds, measure)


def sparse_row(device, rounds):
    name, op_name, size, second, h_q, topk, _, _ = bench_sparse.SPEC_ROWS[2]  # decode fp8 b64 h64: two splits
    make, run, _, _ = bench_sparse.row_op(op_name, size, second, h_q, topk, True, device)
    sets = [make() for _ in range(2)]
    with forced_backend("reference"):
        reference = run(*sets[0])[0]
    op = bench_sparse.triton_run(op_name, None)

    def measure(side):
        take(side)
        err = error(op(*sets[0])[0], reference)
        return time_ms(op, sets) * 1e3, None, err
    run_rounds(name, rounds, measure)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--parts", default="1,2,4", help="this tree's sides: COMBINE_MAX_PARTS of each")
    args = parser.parse_args()
    PARTS[:] = [int(parts) for parts in args.parts.split(",")]
    bench_decode.SETTLE_S = args.settle
    device = torch.device(args.device)
    torch.manual_seed(0)
    for name, batch, s_q, h_q, seqlen in ROWS:
        dense_row(name, batch, s_q, h_q, seqlen, device, args.rounds)
        torch.cuda.empty_cache()
    sparse_row(device, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
