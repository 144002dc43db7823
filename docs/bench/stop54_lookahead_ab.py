"""Stop 54's A/B of the Triton dense decode's block-table lookup a step early (decode._table_page, a loop-carried
scalar, with 64-row tiles at two stages) against the kernel before it (`stop54_decode_base.py`: the tree at 5ff2f29,
a lookup a token inside each step, 64-row tiles at three stages), each at its own default config, on the dense SPEC
rows, in one process, `--rounds` times in turn (the benchmarks' timing: CUDA-graph medians, inputs rotated beyond L2,
settled clock). From the repository root:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop54_lookahead_ab.py --rounds 2
"""
import importlib.util
import sys
from pathlib import Path

import torch

import bench_decode
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import decode as tree
from stop54_apart_ab import ab_arguments, start, time_rounds

# the base module inside the package, so that its relative imports (.common, ..kv_cache) resolve
_spec = importlib.util.spec_from_file_location("flashmla_ops.triton._decode_base",
                                               Path(__file__).with_name("stop54_decode_base.py"))
base = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = base
_spec.loader.exec_module(base)


def main():
    args = ab_arguments(settle=10.0).parse_args()
    device = start(args)
    for name, batch, s_q, h_q, seqlen, is_fp8, _, target in bench_decode.SPEC_ROWS:
        sets, lengths = bench_decode.make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, copies=2)
        runs = {}
        for label, module in (("base", base), ("lookahead", tree)):
            config = module.default_config(batch, s_q * h_q, device, is_fp8)
            runs[label] = (config, lambda q, cache, table, module=module, config=config: module.dense_decode(
                q, cache, table, lengths, KV_LORA_RANK, D_QK ** -0.5, s_q > 1, is_fp8, None, config))
        time_rounds(name, sets, runs, bench_decode.decode_flops(batch, s_q, h_q, seqlen),
                    bench_decode.decode_bytes(batch, s_q, h_q, seqlen, is_fp8), target, args.rounds)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
