"""Stop 54's A/B of the Triton kernels' logits masked apart (common.mask_logits_apart, Hopper's new default at 64
rows) on the Triton SPEC rows: each row's default tiles against the same tiles with it flipped (and, for the sparse
FP8 decode, against its former default, three stages without it), timed as the benchmarks time (CUDA-graph medians,
inputs rotated beyond L2, settled clock), in one process, `--rounds` times in turn; `--wide`: the default against
16 warps instead; `--flip FIELD`: another boolean of the configs flipped instead of `apart_logits` (the rows whose
config has no such field are left out; `wide_latent` with docs/bench/stop54_wide_latent.diff applied). From the
repository root:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop54_apart_ab.py --rounds 2 [--wide | --flip FIELD]
"""
import argparse
import dataclasses
import itertools

import torch

import bench_decode
import bench_sparse
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import decode as triton_decode
from flashmla_ops.triton import sparse as triton_sparse

SCALE = D_QK ** -0.5
FLIP = "apart_logits"  # --flip: the config field the "flipped" variant flips
WIDE = False  # --wide: the default against the same tiles at 16 warps (four warpgroups: with the logits apart they
# split the logits 4 x 16 tokens and P V's 512 columns 4 x 128, 128 registers a thread) instead


def flipped(config):
    return dataclasses.replace(config, **{FLIP: not getattr(config, FLIP)})


def dense_rows(device):
    if FLIP not in {field.name for field in dataclasses.fields(triton_decode.LaunchConfig)}:
        return
    for name, batch, s_q, h_q, seqlen, is_fp8, _, target in bench_decode.SPEC_ROWS:
        if h_q != 128:
            continue
        sets, lengths = bench_decode.make_inputs(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, copies=2)
        default = triton_decode.default_config(batch, s_q * h_q, device, is_fp8)
        variants = {"default": default, "flipped": flipped(default)}
        if WIDE:
            variants = {"default": default, "16 warps": dataclasses.replace(default, num_warps=16)}
        flops = bench_decode.decode_flops(batch, s_q, h_q, seqlen)
        bytes_ = bench_decode.decode_bytes(batch, s_q, h_q, seqlen, is_fp8)

        def runner(config, s_q=s_q, is_fp8=is_fp8, lengths=lengths):
            return lambda q, cache, table: triton_decode.dense_decode(q, cache, table, lengths, KV_LORA_RANK, SCALE,
                                                                      s_q > 1, is_fp8, None, config)
        yield name, sets, {label: (config, runner(config)) for label, config in variants.items()}, flops, bytes_, target


def sparse_rows(device):
    if FLIP not in {field.name for field in dataclasses.fields(triton_sparse.TileConfig)}:
        return
    for name, op, size, second, h_q, topk, _, target in bench_sparse.SPEC_ROWS:
        if op == "decode":
            sets = [bench_sparse.decode_inputs(size, second, h_q, topk, True, device) for _ in range(2)]
            default = triton_sparse.tile_configs(h_q, fp8_decode=True, apart=True)[0]
            variants = {"default": default, "flipped": flipped(default),
                        "former default": triton_sparse.tile_configs(h_q, fp8_decode=True)[0]}
            if WIDE:
                variants = {"default": default, "16 warps": dataclasses.replace(default, num_warps=16)}
            flops = bench_sparse.attention_flops(size * second, h_q, topk)

            def runner(config):
                return lambda q, cache, indices: triton_sparse.sparse_decode(
                    q, cache, indices, None, None, None, None, KV_LORA_RANK, SCALE, True, None, config)
        else:
            sets = [bench_sparse.prefill_inputs(size, second, h_q, topk, device)]
            default = triton_sparse.tile_configs(h_q, apart=True)[0]
            variants = {"default": default, "flipped": flipped(default)}
            if WIDE:
                variants = {"default": default, "16 warps": dataclasses.replace(default, num_warps=16)}
            flops = bench_sparse.attention_flops(size, h_q, topk)

            def runner(config):
                return lambda q, kv, indices: triton_sparse.sparse_prefill(q, kv, indices, SCALE, KV_LORA_RANK,
                                                                           config=config)
        yield (name, sets, {label: (config, runner(config)) for label, config in variants.items()}, flops, None,
               (target, "TFLOP/s"))


def ab_arguments(settle: float) -> argparse.ArgumentParser:
    """The stop 54 A/Bs' arguments: --rounds, and the benchmarks' --settle (default `settle`) and --timer."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    bench_decode.add_timing_arguments(parser)
    parser.set_defaults(settle=settle)
    return parser


def start(args, device="cuda") -> torch.device:
    """Applies the timing arguments and prints what runs the A/B."""
    bench_decode.apply_timing_arguments(args)
    device = torch.device(device)
    print(torch.cuda.get_device_name(device) if device.type == "cuda" else device, "torch", torch.__version__)
    return device


def time_rounds(name, sets, runs, flops, bytes_, target, rounds) -> None:
    """Prints each (label: (config, run)) of `runs`' config, then times the runs on `sets` `rounds` times in turn,
    printing time, TFLOP/s, GB/s (where `bytes_` is given), the target (value, unit) and the clock of each."""
    for label, (config, _) in runs.items():
        print(f"{name} [{label}]: {config}")
    for round_ in range(rounds):
        for label, (_, run) in runs.items():
            ms = bench_decode.time_ms(run, sets)
            note = f" {bytes_ / ms / 1e6:.0f} GB/s" if bytes_ else ""
            print(f"  round {round_} {name:38} {label:15} {ms * 1e3:9.1f} us {flops / ms / 1e9:6.1f} TFLOP/s{note}"
                  f" (target {target[0]} {target[1]}) {bench_decode.clock_note(bench_decode.LAST_CLOCK)}", flush=True)


def main():
    parser = ab_arguments(settle=10.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--wide", action="store_true", help="the default against 16 warps instead")
    parser.add_argument("--flip", default="apart_logits", help="the config field to flip (default: apart_logits)")
    args = parser.parse_args()
    global WIDE, FLIP
    WIDE, FLIP = args.wide, args.flip
    device = start(args, args.device)
    for name, sets, runs, flops, bytes_, target in itertools.chain(dense_rows(device), sparse_rows(device)):
        time_rounds(name, sets, runs, flops, bytes_, target, args.rounds)
        del sets
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
