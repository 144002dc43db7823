"""Stop 56: one SPEC row's ops, run once inside cudaProfilerStart/Stop, for Nsight Compute (`ncu --profile-from-start
off`): what each kernel moved (DRAM and L2 bytes, against the bytes SPEC.md §4 counts), how busy its tensor, shared
memory and issue pipes were, and where its warps stalled. One row a process, so each profile is of that row alone.
From the repository root, with PYTHONPATH=$PWD:$PWD/scripts: `bash docs/bench/stop56_device_call2.sh` runs every row
under ncu; `python docs/bench/stop56_ncu_rows.py --list` names them."""
import argparse

import torch

import bench_decode
import bench_sparse
from flashmla_ops.kv_cache import D_QK, FP8_BYTES, KV_LORA_RANK


def dense_row(batch, s_q, h_q, seqlen, is_fp8, device):
    sets, cache_seqlens = bench_decode.make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, 1)
    q, cache, block_table = sets[0]
    counted = bench_decode.decode_bytes(batch, s_q, h_q, seqlen, is_fp8)
    flops = bench_decode.decode_flops(batch, s_q, h_q, seqlen)
    return (lambda: torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK,
                                                    D_QK ** -0.5, s_q > 1, is_fp8, None)), counted, flops


def sparse_row(op, size, second, h_q, topk, device):
    scale = D_QK ** -0.5
    if op == "decode":
        q, cache, indices = bench_sparse.decode_inputs(size, second, h_q, topk, True, device)
        run = lambda: torch.ops.flashmla.sparse_decode(q, cache, indices, None, None, None, None, None, None,  # noqa
                                                       KV_LORA_RANK, scale, True, None)
        queries, row_bytes = size * second, FP8_BYTES
    else:
        q, kv, indices = bench_sparse.prefill_inputs(size, second, h_q, topk, device)
        run = lambda: torch.ops.flashmla.sparse_prefill(q, kv, indices, scale, KV_LORA_RANK, None, None, 0)  # noqa
        queries, row_bytes = size, D_QK * 2
    counted = bench_sparse.attention_bytes(queries, h_q, topk, row_bytes)
    return run, counted, bench_sparse.attention_flops(queries, h_q, topk)


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
