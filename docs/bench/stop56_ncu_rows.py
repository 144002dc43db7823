"""Stop 56: one SPEC row's ops, run once inside cudaProfilerStart/Stop, for Nsight Compute (`ncu --profile-from-start
off`): what each kernel moved (DRAM and L2 bytes, against the bytes SPEC.md §4 counts), how busy its tensor, shared
memory and issue pipes were, and where its warps stalled. One row a process, so each profile is of that row alone.
From the repository root, with PYTHONPATH=$PWD:$PWD/scripts: `bash docs/bench/stop56_device_call2.sh` runs every row
under ncu; `python docs/bench/stop56_ncu_rows.py --list` names them."""
import argparse

import torch

import bench_decode
import bench_sparse


def dense_row(batch, s_q, h_q, seqlen, is_fp8, device):
    sets, cache_seqlens = bench_decode.make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, 1)
    op = bench_decode.decode_op(cache_seqlens, s_q, is_fp8)
    counted = bench_decode.decode_bytes(batch, s_q, h_q, seqlen, is_fp8)
    return (lambda: op(*sets[0])), counted, bench_decode.decode_flops(batch, s_q, h_q, seqlen)


def sparse_row(op, size, second, h_q, topk, device):
    make, run, queries, row_bytes = bench_sparse.row_op(op, size, second, h_q, topk, op == "decode", device)
    inputs = make()
    counted = bench_sparse.attention_bytes(queries, h_q, topk, row_bytes)
    return (lambda: run(*inputs)), counted, bench_sparse.attention_flops(queries, h_q, topk)


def rows():
    found = {}
    for name, batch, s_q, h_q, seqlen, is_fp8, _, _ in bench_decode.SPEC_ROWS:
        found["dense " + name] = lambda device, a=(batch, s_q, h_q, seqlen, is_fp8): dense_row(*a, device)
    for name, op, size, second, h_q, topk, _, _ in bench_sparse.SPEC_ROWS:
        found["sparse " + name] = lambda device, a=(op, size, second, h_q, topk): sparse_row(*a, device)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--row", type=int, help="the row's number in --list")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--backend", default="cuda", choices=["cuda", "triton"], help="the path the ops take")
    args = parser.parse_args()
    named = rows()
    if args.list or args.row is None:
        for number, name in enumerate(named):
            print(number, name)
        return
    name = list(named)[args.row]
    ops = ("dense_decode", "sparse_decode", "sparse_prefill")
    device = bench_decode.bench_device(args.backend, "stop56_ncu_rows.py", ops)
    run, counted, flops = named[name](device)
    for _ in range(3):  # the build's load and every first-call cost
        run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"row {args.row}: {name} ({args.backend}): counted {counted} bytes, {flops} FLOPs")


if __name__ == "__main__":
    main()
