"""Kernel durations (torch.profiler, CUPTI) of one dense decode op call at one shape, per backend: which kernels run
and how long each takes on the GPU, without the launch gaps that bench_decode.py's graph timing includes.

    python scripts/profile_decode_op.py --batch 1 --h-q 16 --seqlen 1024
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import forced_backend, make_inputs

import flashmla_ops
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--h-q", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--backends", default="cuda,triton")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode_op.py needs a CUDA GPU")
    device = torch.device("cuda")
    sets, seqlens = make_inputs(args.batch, 1, args.h_q, [args.seqlen] * args.batch, False, device, 1)
    q, cache, block_table = sets[0]
    for backend in args.backends.split(","):
        with forced_backend(backend):
            taken = flashmla_ops.backend("dense_decode", device)
            if taken != backend:
                print(f"{backend}: skipped (dense_decode runs {taken} here)")
                continue
            call = lambda: torch.ops.flashmla.dense_decode(q, cache, block_table, seqlens, None, None,  # noqa: E731
                                                           KV_LORA_RANK, D_QK ** -0.5, False, False, None)
            for _ in range(5):
                call()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    call()
                torch.cuda.synchronize()
        print(f"{backend}: batch {args.batch} h_q {args.h_q} seqlen {args.seqlen}, per call:")
        for event in prof.key_averages():
            if event.device_type == torch.autograd.DeviceType.CUDA and event.count:
                print(f"  {event.key[:70]:70s} {event.device_time_total / 20:8.2f} us  x{event.count // 20}")


if __name__ == "__main__":
    main()
