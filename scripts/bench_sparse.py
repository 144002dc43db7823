"""Benchmark DeepSeek Sparse Attention: sparse decode over the paged cache and sparse prefill, SPEC.md §5 rows plus a
sweep, per backend.

Prints per configuration: time, GB/s, TFLOP/s, fraction of the H100 ceilings (SPEC.md §4), the ratio to the SPEC
target, and the speed-up over the reference op on the GPU. Times are medians of CUDA-graph replays over input copies
larger than L2 (bench_decode.py's timing). Indices are random token positions of each sequence (decode: flat cache
slots through a shuffled block table; prefill: rows of the packed kv). Writes JSON and a PNG.

    python scripts/bench_sparse.py                                   # SPEC rows, default backend
    python scripts/bench_sparse.py --sweep --backend triton --out bench/sparse_triton
    python scripts/bench_sparse.py --tune --no-reference      # first: the Triton kernels' tile configs, per SPEC row
"""
import argparse
import dataclasses

import torch
from tqdm import tqdm

import flashmla_ops
from bench_decode import (CEILINGS, LAST_CLOCK, add_timing_arguments, apply_timing_arguments, bench_device, clock_note,
                          eager_ms, fmt, forced_backend, row_filter, save_results, time_ms)
from flashmla_ops.decode import sparse_decode_path
from flashmla_ops.kv_cache import D_QK, FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE
from flashmla_ops.sparse_prefill import sparse_prefill_path

DECODE_CONTEXT = 16384  # tokens per sequence the indices choose from
# (name, op, batch or s_q, s_q or s_kv, h_q, topk, FlashMLA's figure, target TFLOP/s)
SPEC_ROWS = [
    ("decode fp8 b128 h128 topk2048", "decode", 128, 1, 128, 2048, "379 TFLOP/s", 400),
    ("decode fp8 b128 s_q2 h128 topk2048", "decode", 128, 2, 128, 2048, "390 TFLOP/s", 410),
    ("decode fp8 b64 h64 topk2048", "decode", 64, 1, 64, 2048, "212 TFLOP/s", 250),
    ("prefill bf16 s_q4096 h128 s_kv32k", "prefill", 4096, 32768, 128, 2048, "583 TFLOP/s", 600),
    ("prefill bf16 s_q4096 h64 s_kv32k", "prefill", 4096, 32768, 64, 2048, "556 TFLOP/s", 580),
]


def attention_flops(queries, h_q, topk):
    """SPEC.md §4: 2 * queries * h_q * topk * (d_qk + d_v), for decode (queries = batch * s_q) and prefill."""
    return 2 * queries * h_q * topk * (D_QK + KV_LORA_RANK)


def attention_bytes(queries, h_q, topk, kv_row_bytes):
    """KV rows gathered once per query (shared by its heads) plus q and out. SPEC.md §4 counts a decode sequence's
    `topk` rows once; its queries each have their own indices, so s_q 2 counts twice that (the union of two random
    sets of 2048 rows out of a cache is nearly twice as large), and prefill counts the rows gathered, not the kv's
    distinct rows. No target is in GB/s for these rows; the TFLOP/s follow SPEC exactly."""
    return queries * topk * kv_row_bytes + queries * h_q * (D_QK + KV_LORA_RANK) * 2


def random_positions(rows, topk, length, device):
    """`topk` distinct random positions in [0, length) for each of `rows` queries."""
    return torch.rand(rows, length, device=device).argsort(-1)[:, :topk].int()


def decode_inputs(batch, s_q, h_q, topk, is_fp8, device):
    blocks_per_seq = DECODE_CONTEXT // PAGE_BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, device=device, dtype=torch.bfloat16)
    if is_fp8:
        cache = torch.ops.flashmla.quantize_kv_fp8(cache)
    block_table = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
    tokens = random_positions(batch * s_q, topk, DECODE_CONTEXT, device).view(batch, s_q, topk).long()
    blocks = torch.gather(block_table.long(), 1, (tokens // PAGE_BLOCK_SIZE).view(batch, -1)).view_as(tokens)
    indices = (blocks * PAGE_BLOCK_SIZE + tokens % PAGE_BLOCK_SIZE).int()
    q = torch.randn(batch, s_q, h_q, D_QK, device=device, dtype=torch.bfloat16)
    return q, cache, indices


def prefill_inputs(s_q, s_kv, h_q, topk, device):
    q = torch.randn(s_q, h_q, D_QK, device=device, dtype=torch.bfloat16)
    kv = torch.randn(s_kv, 1, D_QK, device=device, dtype=torch.bfloat16)
    return q, kv, random_positions(s_q, topk, s_kv, device)[:, None]


def row_op(op, size, second, h_q, topk, is_fp8, device):
    """A SPEC-form row's (make, run, queries, KV row bytes): `make()` builds a set of inputs, `run(*inputs)` calls the
    op on them. op 'decode': size = batch, second = s_q; op 'prefill': size = s_q, second = s_kv."""
    scale = D_QK ** -0.5
    if op == "decode":
        queries = size * second
        make = lambda: decode_inputs(size, second, h_q, topk, is_fp8, device)  # noqa: E731

        def run(q, cache, indices):
            return torch.ops.flashmla.sparse_decode(q, cache, indices, None, None, None, None, None, None,
                                                    KV_LORA_RANK, scale, is_fp8, None)
        row_bytes = FP8_BYTES if is_fp8 else D_QK * 2
    else:
        queries = size
        make = lambda: prefill_inputs(size, second, h_q, topk, device)  # noqa: E731

        def run(q, kv, indices):
            return torch.ops.flashmla.sparse_prefill(q, kv, indices, scale, KV_LORA_RANK, None, None, 0)
        row_bytes = D_QK * 2
    return make, run, queries, row_bytes


def bench_config(op, size, second, h_q, topk, is_fp8, device, with_reference):
    """op 'decode': size = batch, second = s_q; op 'prefill': size = s_q, second = s_kv."""
    make, run, queries, row_bytes = row_op(op, size, second, h_q, topk, is_fp8, device)
    total_bytes = attention_bytes(queries, h_q, topk, row_bytes)
    sets = [make() for _ in range(max(1, min(4, -(-100 * 2 ** 20 // total_bytes))))]
    path = (sparse_decode_path(sets[0][0], sets[0][1], None, KV_LORA_RANK, is_fp8) if op == "decode"
            else sparse_prefill_path(sets[0][0], sets[0][1], KV_LORA_RANK))
    ms = time_ms(run, sets)
    row = {"op": op, "size": size, "second": second, "h_q": h_q, "topk": topk,
           "kv_cache": "fp8" if is_fp8 else "bf16", "time_us": ms * 1e3, "gb_s": total_bytes / ms / 1e6,
           "tflop_s": attention_flops(queries, h_q, topk) / ms / 1e9, "path": path, **LAST_CLOCK}
    row["bandwidth_fraction"] = row["gb_s"] * 1e9 / CEILINGS["bandwidth"]
    row["compute_fraction"] = row["tflop_s"] * 1e12 / CEILINGS["bf16"]
    if with_reference:
        with forced_backend("reference"):
            reference_ms = eager_ms(run, sets[:1]) if queries * h_q * topk <= 2 ** 27 else None
        row["speedup_vs_reference"] = reference_ms / ms if reference_ms else None
    del sets
    torch.cuda.empty_cache()
    return row


def tune_candidates(h_q: int, apart: bool = False) -> list:
    """The Triton tile configs `--tune` times: the default ladder's first two, then fewer keys per step, one stage, and
    more warps (compiled for sm_90 with the launch's specialization, Triton 3.9: FP8 decode at 64 heads x 64 keys with 8
    warps spills 448 bytes a thread, x 32 keys 344; prefill 304 and 192), and for the decode rows 64 x 64 with the
    indices read a step early (the FP8 decode default's first from 64 heads on, TileConfig.lookahead; the ladder's
    first, its former default, is timed beside it), and 32 keys a step at three and four stages with the indices
    early. `apart` (Hopper): 64-head tiles with their logits masked apart (TileConfig.apart_logits), and the FP8
    decode's first tiles also without (three stages, stop 41's default)."""
    from flashmla_ops.triton.sparse import TileConfig, tile_configs

    ladder = tile_configs(h_q, apart=apart)
    first = ladder[0]
    extra = [TileConfig(first.block_h, block_n, warps, stages, apart_logits=first.apart_logits)
             for block_n in (64, 32) for stages in (2, 1) for warps in (first.num_warps, 2 * first.num_warps)]
    fp8_firsts = {tile_configs(h_q, fp8_decode=True, apart=apart)[0], tile_configs(h_q, fp8_decode=True)[0]}
    # 32 keys a step three and four stages deep, the indices a step early (stop 57: at 64 keys and two stages no
    # step's gathers overlap the step before; compiled for sm_90 these take 188 and 225 KiB)
    deep = [TileConfig(first.block_h, 32, first.num_warps, stages, lookahead=True, apart_logits=first.apart_logits)
            for stages in (3, 4)]
    return list(dict.fromkeys([*ladder[:2], *extra, *sorted(fp8_firsts, key=str), *deep]))


def triton_run(op, config):
    """`run(*inputs)` of a SPEC row's op ('decode': over an FP8 cache; 'prefill') as the Triton function itself at tile
    config `config` (sparse.TileConfig), on inputs as decode_inputs / prefill_inputs make them."""
    from flashmla_ops.triton import sparse as triton_sparse

    scale = D_QK ** -0.5
    if op == "decode":
        return lambda q, cache, indices: triton_sparse.sparse_decode(q, cache, indices, None, None, None, None,
                                                                     KV_LORA_RANK, scale, True, None, config)
    return lambda q, kv, indices: triton_sparse.sparse_prefill(q, kv, indices, scale, KV_LORA_RANK, config=config)


def tune(device, chosen=lambda name: True) -> list[dict]:
    """Times each Triton tile config of `tune_candidates` on every SPEC row `chosen(name)` (--rows) takes (the Triton
    functions called directly)."""
    from flashmla_ops.triton import sparse as triton_sparse

    results = []
    for name, op, size, second, h_q, topk, _, target in SPEC_ROWS:
        if not chosen(name):
            continue
        if op == "decode":
            sets = [decode_inputs(size, second, h_q, topk, True, device) for _ in range(2)]
            flops = attention_flops(size * second, h_q, topk)
        else:
            sets = [prefill_inputs(size, second, h_q, topk, device)]
            flops = attention_flops(size, h_q, topk)
        apart = triton_sparse.warpgroup_products(device)
        default = triton_sparse.tile_configs(h_q, fp8_decode=op == "decode", apart=apart, prefill=op == "prefill")[0]
        for config in tune_candidates(h_q, apart):
            if config.lookahead and op != "decode" and config.block_n == 64 and config.num_stages > 2:  # 288 KiB
                continue
            try:
                ms = time_ms(triton_run(op, config), sets)
            except Exception as error:  # a config the GPU cannot run (shared memory, registers)
                print(f"{name:36} {config}: failed ({type(error).__name__})")
                continue
            tflop_s = flops / ms / 1e9
            results.append({"name": name, "config": dataclasses.asdict(config), "time_us": ms * 1e3,
                            "tflop_s": tflop_s})
            note = " (the default on Hopper)" if config == default else ""
            print(f"{name:36} {config}{note}: {ms * 1e3:9.1f} us {tflop_s:6.1f} TFLOP/s ({tflop_s / target:.2f})")
        del sets
        torch.cuda.empty_cache()
    return results


def sweep_configs():
    for is_fp8 in (False, True):
        for h_q in (16, 64, 128):
            for s_q in (1, 2):
                for batch in (1, 32, 128):
                    for topk in (512, 2048):
                        yield "decode", batch, s_q, h_q, topk, is_fp8
    for h_q in (16, 64, 128):
        for s_q, s_kv in ((1024, 8192), (4096, 32768)):
            for topk in (512, 2048):
                yield "prefill", s_q, s_kv, h_q, topk, False


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for op, color in (("decode", "tab:blue"), ("prefill", "tab:green")):
        picked = [r for r in rows if r["op"] == op]
        ax.scatter([r["h_q"] * r["topk"] for r in picked], [r["tflop_s"] for r in picked], c=color, s=12, label=op)
    ax.axhline(CEILINGS["bf16"] / 1e12, color="k", ls="--", lw=1, label=f"BF16 matmul ceiling: {CEILINGS['gpu']}")
    ax.set_xscale("log")
    ax.set_xlabel("h_q * topk")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("flashmla sparse attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--sweep", action="store_true", help="also run the topk/s_q/h_q/dtype sweep")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the reference op")
    parser.add_argument("--out", default="bench/sparse", help="output prefix for .json and .png")
    parser.add_argument("--tune", action="store_true", help="time the Triton tile configurations first")
    parser.add_argument("--rows", default="", help="only the SPEC rows whose name has one of these comma-separated "
                        "substrings (e.g. 'decode' or 'h128'); --tune likewise")
    add_timing_arguments(parser)
    args = parser.parse_args()
    apply_timing_arguments(args)
    wanted = row_filter(args.rows)
    device = bench_device(args.backend, "bench_sparse.py", ("sparse_decode", "sparse_prefill"))
    tuned = tune(device, wanted) if args.tune else []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends: sparse_decode "
          f"{flashmla_ops.backend('sparse_decode', device)}, "
          f"sparse_prefill {flashmla_ops.backend('sparse_prefill', device)}")
    print(f"{'configuration':36} {'time us':>9} {'GB/s':>7} {'TFLOP/s':>8} {'%MMA':>5} {'FlashMLA':>12} {'target':>8} "
          f"{'vs target':>9} {'x ref':>7}")
    rows = []
    for name, op, size, second, h_q, topk, flashmla, target in SPEC_ROWS:
        if not wanted(name):
            continue
        row = bench_config(op, size, second, h_q, topk, op == "decode", device, not args.no_reference)
        row.update(name=name, flashmla=flashmla, target=f">= {target} TFLOP/s", vs_target=row["tflop_s"] / target)
        rows.append(row)
        print(f"{name:36} {row['time_us']:9.1f} {row['gb_s']:7.0f} {row['tflop_s']:8.1f} "
              f"{100 * row['compute_fraction']:5.1f} {flashmla:>12} {target:8} {row['vs_target']:9.2f} "
              f"{fmt(row.get('speedup_vs_reference'), 1):>7}{clock_note(row)}")
    spec_count = len(rows)
    if not rows and not args.sweep:
        raise SystemExit(f"bench_sparse.py: no row's name has one of --rows {args.rows!r}")
    if args.sweep:
        for op, size, second, h_q, topk, is_fp8 in tqdm(list(sweep_configs()), desc="sweep"):
            rows.append(bench_config(op, size, second, h_q, topk, is_fp8, device, with_reference=False))
        print(f"{'op':7} {'kv':4} {'size':>5} {'2nd':>6} {'h_q':>4} {'topk':>5} {'time us':>9} {'GB/s':>7} "
              f"{'TFLOP/s':>8}")
        for r in rows[spec_count:]:
            print(f"{r['op']:7} {r['kv_cache']:4} {r['size']:5} {r['second']:6} {r['h_q']:4} {r['topk']:5} "
                  f"{r['time_us']:9.1f} {r['gb_s']:7.0f} {r['tflop_s']:8.1f}{clock_note(r)}")
    save_results(args.out, args.backend, rows, plot, tuning=tuned)


if __name__ == "__main__":
    main()
