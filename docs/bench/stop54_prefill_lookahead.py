"""Stop 54's A/B of the Triton sparse prefill with each tile's indices read a step early (TileConfig.lookahead, now
honoured by prefill) against its default, on the two prefill SPEC rows, in one process, `--rounds` times in turn.
From the repository root: PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop54_prefill_lookahead.py --rounds 2"""
import argparse
import dataclasses

import torch

import bench_decode
import bench_sparse
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import sparse as triton_sparse


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--settle", type=float, default=5.0)
    args = parser.parse_args()
    bench_decode.SETTLE_S = args.settle
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device), "torch", torch.__version__)
    for name, op, s_q, s_kv, h_q, topk, _, target in bench_sparse.SPEC_ROWS:
        if op != "prefill":
            continue
        sets = [bench_sparse.prefill_inputs(s_q, s_kv, h_q, topk, device)]
        default = triton_sparse.tile_configs(h_q, apart=triton_sparse.warpgroup_products(device))[0]
        runs = {}
        for label, config in (("default", default), ("lookahead", dataclasses.replace(default, lookahead=True))):
            print(f"{name} [{label}]: {config}")
            runs[label] = lambda q, kv, indices, config=config: triton_sparse.sparse_prefill(
                q, kv, indices, D_QK ** -0.5, KV_LORA_RANK, config=config)
        flops = bench_sparse.attention_flops(s_q, h_q, topk)
        for round_ in range(args.rounds):
            for label, run in runs.items():
                ms = bench_decode.time_ms(run, sets)
                print(f"  round {round_} {name:34} {label:10} {ms * 1e3:9.1f} us {flops / ms / 1e9:6.1f} TFLOP/s "
                      f"(target {target}){bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)


if __name__ == "__main__":
    main()
