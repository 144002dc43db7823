"""Benchmark the DSA lightning indexer logits ops (packed prefill, paged decode), per backend, and the top-k op.

Prints per configuration: the path taken (cuda, triton, reference), time, GB/s, TFLOP/s, the SPEC.md §5 target where
there is one (indexer logits FP8: >= 60% of the FP8 matmul rate) and the speed-up over the reference op on the GPU.
Logits FLOPs: `2 * s_q * h_i * keys * d_i` over every key in range; bytes: q, keys (FP8: with their float32 scales)
and weights read once, float32 logits written. Times are medians of CUDA-graph replays (bench_decode.py's timing).
Writes JSON and a PNG.

    python scripts/bench_indexer.py                                  # default backend (fastest available)
    python scripts/bench_indexer.py --backend triton --out bench/indexer_triton
    python scripts/bench_indexer.py --backend triton --tune --rows "logits fp8"   # tile configs, then the rows
    python scripts/bench_indexer.py --topk --rows none      # the op's top-k kernel against torch.topk
"""
import argparse
import dataclasses

import torch
import triton

import flashmla_ops
from bench_decode import (L2_BYTES, LAST_CLOCK, add_timing_arguments, apply_timing_arguments, bench_device, clock_note,
                          eager_ms, fmt, forced_backend, row_filter, save_results, time_ms)
from flashmla_ops.indexer import indexer_logits_paged_path, indexer_logits_path
from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE, quantize_fp8_rows, quantize_index_fp8_reference

PEAK_FP8 = 1250e12  # FLOP/s, FP8 matmul on the lent H100 (SPEC.md §4)
# (name, kind, rows: s_q or batch, keys: s_kv or context, h_i, d_i, fp8)
ROWS = [
    ("logits fp8 s_q4096 h64 s_kv32k", "logits", 4096, 32768, 64, 128, True),
    ("logits bf16 s_q4096 h64 s_kv32k", "logits", 4096, 32768, 64, 128, False),
    ("paged logits fp8 b128 h64 ctx32k", "paged", 128, 32768, 64, 128, True),
    ("paged logits bf16 b128 h64 ctx32k", "paged", 128, 32768, 64, 128, False),
]
TARGET_FRACTION = 0.6  # of PEAK_FP8, for the FP8 prefill logits row


def operand(x, fp8):
    """(..., d) float -> (e4m3 values, float32 per-row power-of-two scales `(...)`) or (bf16 values, None)."""
    if not fp8:
        return x.bfloat16(), None
    return quantize_fp8_rows(x)


def make_call(kind, rows, keys, h_i, d_i, fp8, device):
    """(the op call on its arguments, the argument sets, FLOPs, bytes) for one configuration: as many sets as make
    the inputs read twice L2 (SPEC.md §4: rotating inputs larger than L2), at most 4."""
    call, args, flops, total_bytes, read = _one_set(kind, rows, keys, h_i, d_i, fp8, device)
    copies = max(1, min(4, -(-2 * L2_BYTES // read)))
    sets = [args] + [_one_set(kind, rows, keys, h_i, d_i, fp8, device)[1] for _ in range(copies - 1)]
    return call, sets, flops, total_bytes


def tensor_bytes(*tensors) -> int:
    """Bytes of the tensors given (None: an operand without scales)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _one_set(kind, rows, keys, h_i, d_i, fp8, device):
    if kind == "logits":
        q, q_scale = operand(torch.randn(rows, h_i, d_i, device=device), fp8)
        k, k_scale = operand(torch.randn(keys, d_i, device=device), fp8)
        weights = torch.randn(rows, h_i, device=device)
        k_start = torch.zeros(rows, dtype=torch.int32, device=device)
        k_end = torch.full((rows,), keys, dtype=torch.int32, device=device)
        args = (q, k, weights, k_start, k_end, q_scale, k_scale)
        call = torch.ops.flashmla.indexer_logits
        read = tensor_bytes(q, q_scale, k, k_scale)
    else:
        blocks_per_seq = keys // PAGE_BLOCK_SIZE
        cache = torch.randn(rows * blocks_per_seq, PAGE_BLOCK_SIZE, d_i, device=device)
        cache = quantize_index_fp8_reference(cache) if fp8 else cache.bfloat16()
        q, q_scale = operand(torch.randn(rows, 1, h_i, d_i, device=device), fp8)
        block_table = torch.randperm(rows * blocks_per_seq, device=device, dtype=torch.int32).view(rows, -1)
        seqlens = torch.full((rows,), keys, dtype=torch.int32, device=device)
        args = (q, cache, torch.randn(rows, 1, h_i, device=device), block_table, seqlens, q_scale)
        call = torch.ops.flashmla.indexer_logits_paged
        read = tensor_bytes(q, q_scale, cache)  # the FP8 cache's rows hold their scales
    flops = 2 * rows * h_i * keys * d_i
    return call, args, flops, read + rows * h_i * 4 + rows * keys * 4, read


def bench_row(kind, rows, keys, h_i, d_i, fp8, device, with_reference):
    call, sets, flops, total_bytes = make_call(kind, rows, keys, h_i, d_i, fp8, device)
    ms = time_ms(call, sets)
    path = (indexer_logits_path if kind == "logits" else indexer_logits_paged_path)(sets[0][0], sets[0][1])
    row = {"kind": kind, "rows": rows, "keys": keys, "h_i": h_i, "d_i": d_i, "fp8": fp8, "path": path,
           "time_us": ms * 1e3, "gb_s": total_bytes / ms / 1e6, "tflop_s": flops / ms / 1e9, **LAST_CLOCK}
    if with_reference:
        with forced_backend("reference"):
            reference_ms = eager_ms(call, sets)
        row["speedup_vs_reference"] = reference_ms / ms
    del sets
    torch.cuda.empty_cache()
    return row


def tune(device, chosen):
    """Time the Triton logits kernel's tile configs on the chosen rows: the default, then 1-4 queries by 64 or 128
    keys, 4 or 8 warps, 2 or 3 stages (the default among them: timed twice), on FP8 rows also with the e4m3 MMAs
    (`fp8_mma`), whose largest error against the default's logits is printed as a fraction of the largest logit."""
    from flashmla_ops.triton import indexer as triton_indexer

    results = []
    for name, kind, rows, keys, h_i, d_i, fp8 in ROWS:
        if not chosen(name):
            continue
        _, sets, flops, _ = make_call(kind, rows, keys, h_i, d_i, fp8, device)
        default = triton_indexer.default_logits_config(triton.next_power_of_2(h_i), kind == "paged", fp8)
        candidates = [default]
        candidates += [triton_indexer.LogitsConfig(block_q=block_q, block_n=block_n, num_warps=warps,
                                                   num_stages=stages, fp8_mma=fp8_mma)
                       for block_q in (1, 2, 4) for block_n in (64, 128) for warps in (4, 8) for stages in (2, 3)
                       for fp8_mma in ((False, True) if fp8 else (False,))
                       if block_q * h_i * block_n <= 128 * 32 * warps]  # at most 128 accumulator registers
        exact = None  # the default's logits, against which the e4m3 MMAs' error is measured
        for config in candidates:
            if kind == "logits":
                def op(q, k, weights, k_start, k_end, q_scale, k_scale, config=config):
                    return triton_indexer.indexer_logits(q, k, weights, k_start, k_end, q_scale, k_scale, config)
            else:
                def op(q, cache, weights, block_table, seqlens, q_scale, config=config):
                    return triton_indexer.indexer_logits_paged(q, cache, weights, block_table, seqlens, q_scale,
                                                               config)
            try:
                ms = time_ms(op, sets)
            except Exception as failure:  # a config the GPU cannot run (shared memory, registers)
                print(f"{name:36} {config}: failed ({type(failure).__name__}: {str(failure)[:80]})")
                continue
            error = None
            if config == default and exact is None:
                exact = op(*sets[0])
            elif config.fp8_mma and exact is not None:
                got, finite = op(*sets[0]), torch.isfinite(exact)
                error = ((got[finite] - exact[finite]).abs().max() / exact[finite].abs().max()).item()
                del got, finite
            results.append({"name": name, "config": dataclasses.asdict(config), "time_us": ms * 1e3,
                            "tflop_s": flops / ms / 1e9, "max_error_of_largest": error})
            print(f"{name:36} {'(default) ' if config == default else ''}{config}: {ms * 1e3:9.1f} us "
                  f"{flops / ms / 1e9:7.1f} TFLOP/s" + (f"  max error {error:.2e} of the largest logit"
                                                        if error is not None else ""))
        del exact
        del sets
        torch.cuda.empty_cache()
    return results


TOPK_ROWS = [(128, 32768), (128, 131072), (4096, 32768)]  # (rows, keys), topk 2048


def time_topk(device):
    """The op's top-k (on Hopper the CUDA radix select) against torch.topk and the reference (torch.topk, then the
    ties at the threshold from the lowest positions, in key order: the path on other GPUs), topk 2048 of random
    logits with a -inf tail (the unseen end of a paged row); GB/s counts the logits read once and the indices
    written."""
    from flashmla_ops.indexer import indexer_topk_reference

    results = []
    print(f"indexer_topk: {flashmla_ops.backend('indexer_topk', device)}")
    for rows, keys in TOPK_ROWS:
        logits = torch.randn(rows, keys, device=device)
        logits[:, keys - keys // 8:] = float("-inf")
        op_ms = time_ms(lambda x: torch.ops.flashmla.indexer_topk(x, 2048, None), [(logits,)])
        torch_ms = time_ms(lambda x: torch.topk(x, 2048), [(logits,)])
        reference_ms = time_ms(lambda x: indexer_topk_reference(x, 2048), [(logits,)])
        gb_s = rows * (keys + 2048) * 4 / (op_ms * 1e-3) / 1e9
        results.append({"rows": rows, "keys": keys, "topk": 2048, "op_us": op_ms * 1e3, "torch_topk_us": torch_ms * 1e3,
                        "reference_us": reference_ms * 1e3, "gb_s": gb_s})
        print(f"topk 2048 of {rows} x {keys}: the op {op_ms * 1e3:9.1f} us ({gb_s:5.0f} GB/s), torch.topk "
              f"{torch_ms * 1e3:9.1f} us ({torch_ms / op_ms:.2f}x the op's time), the reference "
              f"{reference_ms * 1e3:9.1f} us")
        del logits
    return results


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["name"] for r in rows], [r["time_us"] for r in rows], color="tab:purple")
    ax.set_xscale("log")
    ax.set_xlabel("time (us)")
    ax.set_title("flashmla indexer logits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--no-reference", action="store_true", help="skip timing the reference op")
    parser.add_argument("--out", default="bench/indexer", help="output prefix for .json and .png")
    parser.add_argument("--rows", default="", help="comma-separated substrings: only the rows whose name has one")
    parser.add_argument("--tune", action="store_true", help="time the Triton logits kernel's tile configs first")
    parser.add_argument("--topk", action="store_true", help="also time the op's top-k against torch.topk")
    add_timing_arguments(parser)
    args = parser.parse_args()
    apply_timing_arguments(args)
    device = bench_device(args.backend, "bench_indexer.py", ("indexer_logits", "indexer_logits_paged"))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends: "
          + ", ".join(f"{op} {flashmla_ops.backend(op, device)}" for op in ("indexer_logits", "indexer_logits_paged")))
    chosen = row_filter(args.rows)
    tuned = tune(device, chosen) if args.tune else []
    print(f"{'configuration':36} {'path':>9} {'time us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'target':>12} "
          f"{'vs target':>9} {'x ref':>7}")
    results = []
    for name, kind, rows, keys, h_i, d_i, fp8 in ROWS:
        if not chosen(name):
            continue
        row = bench_row(kind, rows, keys, h_i, d_i, fp8, device, not args.no_reference)
        row["name"] = name
        if kind == "logits" and fp8:
            row["target"] = f">= {TARGET_FRACTION * PEAK_FP8 / 1e12:.0f} TFLOP/s"
            row["vs_target"] = row["tflop_s"] * 1e12 / (TARGET_FRACTION * PEAK_FP8)
        results.append(row)
        print(f"{name:36} {row['path']:>9} {row['time_us']:9.1f} {row['gb_s']:7.0f} {row['tflop_s']:8.1f}"
              f" {row.get('target', '-'):>12} {fmt(row.get('vs_target'), 2):>9}"
              f" {fmt(row.get('speedup_vs_reference'), 1):>7}{clock_note(row)}")
    if not results and not args.topk:
        raise SystemExit(f"bench_indexer.py: no row's name has one of --rows {args.rows!r}")
    topk = time_topk(device) if args.topk else []
    save_results(args.out, args.backend, results, plot, tuning=tuned, topk=topk)


if __name__ == "__main__":
    main()
