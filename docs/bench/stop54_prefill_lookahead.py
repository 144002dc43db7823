"""Stop 54's A/B of the Triton sparse prefill with each tile's indices read a step early (TileConfig.lookahead, now
honoured by prefill) against its default, on the two prefill SPEC rows, in one process, `--rounds` times in turn.
From the repository root: PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop54_prefill_lookahead.py --rounds 2"""
import dataclasses

import bench_sparse
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import sparse as triton_sparse
from stop54_apart_ab import ab_arguments, start, time_rounds


def main():
    args = ab_arguments(settle=5.0).parse_args()
    device = start(args)
    for name, op, s_q, s_kv, h_q, topk, _, target in bench_sparse.SPEC_ROWS:
        if op != "prefill":
            continue
        sets = [bench_sparse.prefill_inputs(s_q, s_kv, h_q, topk, device)]
        default = triton_sparse.tile_configs(h_q, apart=triton_sparse.warpgroup_products(device))[0]
        variants = (("default", default), ("lookahead", dataclasses.replace(default, lookahead=True)))
        runs = {label: (config, lambda q, kv, indices, config=config: triton_sparse.sparse_prefill(
                    q, kv, indices, D_QK ** -0.5, KV_LORA_RANK, config=config)) for label, config in variants}
        time_rounds(name, sets, runs, bench_sparse.attention_flops(s_q, h_q, topk), None, (target, "TFLOP/s"),
                    args.rounds)


if __name__ == "__main__":
    main()
