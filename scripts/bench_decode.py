"""Benchmark the paged MLA decode op: SPEC.md §5 decode rows plus a sweep, per backend.

Prints per configuration: time, GB/s, TFLOP/s, fraction of the H100 ceilings (SPEC.md §4), the ratio to the SPEC
target, and the speed-up over the reference op on the GPU and over scaled_dot_product_attention on the equivalent
expanded tensors. Times are medians of CUDA-graph replays (host dispatch excluded, as in a captured decode
step), rotating over input copies larger than L2; `--timer events` takes SPEC.md §4's method instead (CUDA events
around single eager calls, triton.testing.do_bench's median, L2 flushed between calls). Writes JSON and a PNG
roofline plot.

    python scripts/bench_decode.py                      # SPEC rows, default backend (fastest available)
    python scripts/bench_decode.py --sweep --backend triton --out bench/decode_triton
"""
import argparse
import contextlib
import dataclasses
import importlib.metadata
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

import flashmla_ops
import gpu_clock
from flashmla_ops.decode import cuda_dense_kernel, dense_decode_path
from flashmla_ops.kv_cache import D_QK, FP8_BYTES, KV_LORA_RANK, PAGE_BLOCK_SIZE

# The ceilings fractions are taken of: SPEC.md §4's on an H100 (device-to-device copy in bytes/s counting read and
# write; BF16 matmul FLOP/s, the middle of the measured 690..800), measured by bench_device on any other GPU.
CEILINGS = {"gpu": "H100 (SPEC.md §4)", "bandwidth": 3.0e12, "bf16": 745e12}
L2_BYTES = 50 * 2 ** 20
# Before each timing, wait up to this many seconds for a GPU slowed by earlier work (its power cap, heat) to recover
# (gpu_clock.settle; the scripts' --settle); the clock each timing ended at goes to LAST_CLOCK, and from there to the
# row (stop 41: the same kernel 278 or 349 us depending on what ran before it).
SETTLE_S = 20.0
LAST_CLOCK: dict = {}
# How a call is timed (the scripts' --timer): "graph", CUDA-graph replays of back-to-back calls (a captured decode
# step: no host dispatch, no gap between kernels), or "events", SPEC.md §4's do_bench median of single eager calls
# (FlashMLA's figures were timed so: host dispatch that the GPU waits for is counted, L2 flushed before each call).
TIMERS = ("graph", "events")
TIMER = "graph"

# (name, batch, s_q, h_q, seqlen, is_fp8, FlashMLA's figure, target: (value, unit))
SPEC_ROWS = [
    ("bf16 b128 h16 4k", 128, 1, 16, 4096, False, "2631 GB/s", (2750, "GB/s")),
    ("bf16 b128 h16 16k", 128, 1, 16, 16384, False, "2838 GB/s", (2850, "GB/s")),
    ("bf16 b128 h128 4k", 128, 1, 128, 4096, False, "557 TFLOP/s", (600, "TFLOP/s")),
    ("bf16 b128 s_q2 h128 4k", 128, 2, 128, 4096, False, "609 TFLOP/s", (640, "TFLOP/s")),
    ("bf16 b1 h128 32k", 1, 1, 128, 32768, False, "803 GB/s", (2000, "GB/s")),
    ("bf16 b8 h16 32k", 8, 1, 16, 32768, False, "2353 GB/s", (2700, "GB/s")),
    ("fp8 b128 h16 16k", 128, 1, 16, 16384, True, "-", (1.6, "x bf16 tokens/s")),
]


def decode_flops(batch, s_q, h_q, seqlen):
    return 2 * batch * s_q * h_q * seqlen * (D_QK + KV_LORA_RANK)


def decode_bytes(batch, s_q, h_q, seqlen, is_fp8):
    kv = batch * seqlen * (FP8_BYTES if is_fp8 else D_QK * 2)
    return kv + batch * s_q * h_q * (D_QK + KV_LORA_RANK) * 2


def make_inputs(batch, s_q, h_q, seqlens, is_fp8, device, copies):
    """`copies` independent caches (rotated between timed runs so the working set exceeds L2)."""
    blocks_per_seq = -(-max(seqlens) // PAGE_BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    sets = []
    for _ in range(copies):
        cache = torch.randn(num_blocks, PAGE_BLOCK_SIZE, 1, D_QK, device=device, dtype=torch.bfloat16)
        if is_fp8:
            cache = torch.ops.flashmla.quantize_kv_fp8(cache)
        block_table = torch.randperm(num_blocks, device=device, dtype=torch.int32).view(batch, blocks_per_seq)
        sets.append((torch.randn(batch, s_q, h_q, D_QK, device=device, dtype=torch.bfloat16), cache, block_table))
    return sets, torch.tensor(seqlens, dtype=torch.int32, device=device)


def row_filter(rows: str):
    """`--rows` as a predicate on row names: a comma-separated list of substrings, a row chosen if its name has one
    (every row when empty)."""
    wanted = [part for part in rows.split(",") if part]
    return lambda name: not wanted or any(part in name for part in wanted)


def time_ms(fn, sets, repeats=20):
    """Median time of one call, as CUDA-graph replays (the way a decode step runs in production, so host-side
    dispatch is not counted), rotating over `sets` so that the inputs are not all L2-resident; or with TIMER
    "events", do_bench's (`events_ms`). Waits for the GPU to settle first (SETTLE_S) and leaves the clock it ended
    at (and the timer) in LAST_CLOCK."""
    fn(*sets[0])  # compile / warm up outside the capture
    torch.cuda.synchronize()
    if TIMER == "events":
        return events_ms(fn, sets)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in sets:
            fn(*args)
    settled_s = gpu_clock.settle(timeout_s=SETTLE_S) if SETTLE_S > 0 else None
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(sets))
    _record_clock(settled_s)
    return sorted(times)[len(times) // 2]


def events_ms(fn, sets):
    """SPEC.md §4's timing: triton.testing.do_bench's median over single eager calls (CUDA events around each, L2
    flushed before it), the calls rotating over `sets`."""
    import triton.testing

    settled_s = gpu_clock.settle(timeout_s=SETTLE_S) if SETTLE_S > 0 else None
    turn = itertools.count()
    ms = triton.testing.do_bench(lambda: fn(*sets[next(turn) % len(sets)]), warmup=25, rep=200,
                                 return_mode="median")
    _record_clock(settled_s)
    return ms


def _record_clock(settled_s) -> None:
    LAST_CLOCK.clear()
    LAST_CLOCK.update(gpu_clock.row_fields(gpu_clock.read(), settled_s), timer=TIMER)


def clock_note(row: dict) -> str:
    """The SM clock a row's timing ended at, and any slowdown reason then, for its printed line."""
    if "sm_clock_mhz" not in row:
        return ""
    timer = " (events)" if row.get("timer") == "events" else ""
    return f" {row['sm_clock_mhz']:5d} MHz" + "".join(f" {reason}" for reason in row["slowdowns"]) + timer


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--settle", type=float, default=SETTLE_S, metavar="SECONDS",
                        help="before each timing, wait up to SECONDS for the GPU to leave a power or thermal "
                             f"slowdown (default {SETTLE_S:g}; 0: do not wait)")
    parser.add_argument("--timer", default=TIMER, choices=TIMERS,
                        help="graph: medians of CUDA-graph replays of back-to-back calls (default); events: "
                             "SPEC.md §4's triton.testing.do_bench median of single eager calls")


def apply_timing_arguments(args: argparse.Namespace) -> None:
    global SETTLE_S, TIMER
    SETTLE_S, TIMER = args.settle, args.timer


def eager_ms(fn, sets):
    """Median time of one eager call (for the reference op, whose host syncs keep it out of CUDA graphs)."""
    import triton.testing

    return triton.testing.do_bench(lambda: fn(*sets[0]), warmup=25, rep=200, return_mode="median")


def sdpa_ms(batch, s_q, h_q, seqlen, device):
    """scaled_dot_product_attention over the expanded equivalent: h_q heads of 576/512, one shared KV head."""
    if batch * seqlen * h_q * (D_QK + KV_LORA_RANK) * 2 > 20 * 2 ** 30:
        return None  # the expanded tensors would not fit
    q = torch.randn(batch, h_q, s_q, D_QK, device=device, dtype=torch.bfloat16)
    k = torch.randn(batch, 1, seqlen, D_QK, device=device, dtype=torch.bfloat16).expand(batch, h_q, seqlen, D_QK)
    v = k[..., :KV_LORA_RANK]
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
    try:
        return time_ms(lambda: fn(), [()])
    except (RuntimeError, torch.OutOfMemoryError):
        return None


def decode_op(cache_seqlens, s_q, is_fp8, schedule=(None, None)):
    """`op(q, cache, block_table)`: the dense decode op as the SPEC rows call it (causal from 2 queries on), split by
    shape or by `schedule` (get_mla_metadata's pair)."""
    def op(q, cache, block_table):
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, *schedule, KV_LORA_RANK,
                                               D_QK ** -0.5, s_q > 1, is_fp8, None)
    return op


def bench_config(batch, s_q, h_q, seqlens, is_fp8, device, with_baselines, scheduled=False):
    seqlen = sum(seqlens) // len(seqlens)
    per_set = decode_bytes(batch, s_q, h_q, seqlen, is_fp8)
    copies = max(1, min(8, -(-2 * L2_BYTES // per_set)))
    sets, cache_seqlens = make_inputs(batch, s_q, h_q, seqlens, is_fp8, device, copies)
    # scheduled: the metadata from get_mla_metadata, computed once per step (FlashMLA's calling convention)
    schedule = (torch.ops.flashmla.get_mla_metadata(cache_seqlens, flashmla_ops.num_sm_parts(device, s_q, h_q))
                if scheduled else (None, None))
    op = decode_op(cache_seqlens, s_q, is_fp8, schedule)

    path = dense_decode_path(sets[0][0], sets[0][1], KV_LORA_RANK, is_fp8)
    ms = time_ms(op, sets)
    flops = sum(decode_flops(1, s_q, h_q, length) for length in seqlens)
    total_bytes = sum(decode_bytes(1, s_q, h_q, length, is_fp8) for length in seqlens)
    row = {"batch": batch, "s_q": s_q, "h_q": h_q, "seqlen": seqlen, "skewed": len(set(seqlens)) > 1,
           "kv_cache": "fp8" if is_fp8 else "bf16", "time_us": ms * 1e3, "gb_s": total_bytes / ms / 1e6,
           "tflop_s": flops / ms / 1e9, "path": path if path != "cuda" else f"cuda {cuda_dense_kernel(s_q * h_q)}",
           "scheduled": scheduled, **LAST_CLOCK}
    row["bandwidth_fraction"] = row["gb_s"] * 1e9 / CEILINGS["bandwidth"]
    row["compute_fraction"] = row["tflop_s"] * 1e12 / CEILINGS["bf16"]
    if with_baselines:
        with forced_backend("reference"):
            reference_ms = eager_ms(op, sets[:1]) if batch * seqlen <= 2 ** 21 else None
        row["speedup_vs_reference"] = reference_ms / ms if reference_ms else None
        sdpa = sdpa_ms(batch, s_q, h_q, seqlen, device) if not is_fp8 else None
        row["speedup_vs_sdpa"] = sdpa / ms if sdpa else None
    del sets
    torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def forced_backend(choice):
    """Run the ops on one backend (FLASHMLA_BACKEND) for the duration."""
    saved = os.environ.get("FLASHMLA_BACKEND")
    os.environ["FLASHMLA_BACKEND"] = choice
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FLASHMLA_BACKEND")
        else:
            os.environ["FLASHMLA_BACKEND"] = saved


# (name, s_q, h_q, seqlens, is_fp8): SPEC rows of each regime, plus one long sequence among short ones
TUNE_ROWS = [(name, s_q, h_q, [seqlen] * batch, is_fp8)
             for name, batch, s_q, h_q, seqlen, is_fp8, _, _ in (SPEC_ROWS[i] for i in (0, 2, 4, 6))]
TUNE_ROWS.append(("bf16 skewed b32 h16", 1, 16, [32768] + [512] * 31, False))


def tune(device, chosen):
    """Time the Triton kernel's launch configurations on representative SPEC rows (one table per row; those chosen)."""
    from flashmla_ops.triton import decode as triton_decode
    from flashmla_ops.triton.common import amd_gpus

    results = []
    for name, s_q, h_q, seqlens, is_fp8 in TUNE_ROWS:
        if not chosen(name):
            continue
        batch = len(seqlens)
        sets, cache_seqlens = make_inputs(batch, s_q, h_q, seqlens, is_fp8, device, copies=2)
        default = triton_decode.default_config(batch, s_q * h_q, device, is_fp8)
        candidates = {default}
        for block_n in (32, 64):
            for num_stages in (2, 3):
                for programs_per_sm in (1, 2, 4):
                    candidates.add(dataclasses.replace(default, block_n=block_n, num_stages=num_stages,
                                                       programs_per_sm=programs_per_sm))
        if h_q * s_q >= 64:
            candidates |= {dataclasses.replace(default, block_h=32, num_warps=4, programs_per_sm=p, apart_logits=False)
                           for p in (1, 2)}
            # 64-row tiles (wgmma; 32-row tiles take mma.sync) at one program per SM, where the default has 32 rows
            # (b1 h128: not timed so far)
            candidates |= {dataclasses.replace(default, block_h=64, num_warps=8, programs_per_sm=1, num_stages=stages,
                                               block_n=block_n) for stages in (2, 3) for block_n in (32, 64)}
        candidates |= {dataclasses.replace(config, schedule="balanced") for config in list(candidates)
                       if config.num_stages == default.num_stages and config.block_n == default.block_n}
        # Twice the default's warps; for FP8, both products (f16 and bf16), each with and without the prefetch of
        # the next tile's latent bytes, and with the reload. At the default stages, programs per SM and rows, uniform
        # schedule.
        alike = [config for config in candidates if config.num_stages == default.num_stages
                 and config.programs_per_sm == default.programs_per_sm and config.block_h == default.block_h
                 and config.schedule == "uniform"]
        wider = {dataclasses.replace(config, num_warps=2 * config.num_warps) for config in alike}
        candidates |= wider
        if is_fp8:
            products = {dataclasses.replace(config, fp8_f16=f16) for config in (*alike, *wider)
                        for f16 in (True, False)}
            candidates |= products | {dataclasses.replace(config, prefetch=True) for config in products}
            # and P V's latent loaded again (stop 51), where the products are mma.sync (rows up to 32)
            candidates |= {dataclasses.replace(config, prefetch=False, reload=True) for config in products
                           if config.block_h <= 32}
            if default.block_h <= 16:  # 16-token tiles: 171 registers, or 168 (3 programs per SM) with maxnreg
                caps = (None,) if amd_gpus() else (None, 168)  # maxnreg is ptxas's (Triton's HIP backend has none)
                candidates |= {dataclasses.replace(default, block_n=16, prefetch=True, fp8_f16=True,
                                                   programs_per_sm=programs_per_sm, maxnreg=maxnreg)
                               for programs_per_sm in (2, 3, 4) for maxnreg in caps}
        # the 64-row tiles of 8 warps with their logits masked apart and not (LaunchConfig.apart_logits; Hopper's
        # default has them apart)
        candidates |= {dataclasses.replace(config, apart_logits=not config.apart_logits) for config in list(candidates)
                       if config.block_h == 64 and config.num_warps == 8}
        # a BF16 cache's latent as one tile (LaunchConfig.whole) in 64-row tiles: 64 tokens two stages deep, 32 three
        # and four
        if not is_fp8 and default.block_h == 64:
            candidates |= {dataclasses.replace(default, whole=True, block_n=block_n, num_stages=stages)
                           for block_n, stages in ((64, 2), (32, 3), (32, 4))}
        for config in sorted(candidates, key=str):
            def op(q, cache, block_table, config=config):
                return triton_decode.dense_decode(q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5,
                                                  s_q > 1, is_fp8, None, config)
            try:
                ms = time_ms(op, sets)
            except Exception as error:  # a config the GPU cannot run (shared memory, registers)
                print(f"{name:24} {config}: failed ({type(error).__name__})")
                continue
            gb_s = sum(decode_bytes(1, s_q, h_q, length, is_fp8) for length in seqlens) / ms / 1e6
            results.append({"name": name, "config": dataclasses.asdict(config), "time_us": ms * 1e3, "gb_s": gb_s})
            print(f"{name:24} {'(default) ' if config == default else ''}{config}: {ms * 1e3:8.1f} us {gb_s:6.0f} GB/s")
        del sets
        torch.cuda.empty_cache()
    return results


def sweep_configs():
    for is_fp8 in (False, True):
        for h_q in (16, 64, 128):
            for s_q in (1, 2):
                for batch in (1, 8, 32, 128):
                    for seqlen in (512, 4096, 32768):
                        if batch * seqlen <= 128 * 16384:
                            yield batch, s_q, h_q, [seqlen] * batch, is_fp8
                # skewed: one long sequence among short ones
                yield 32, 1, h_q, [32768] + [512] * 31, is_fp8


def fmt(value, digits=0):
    return "-" if value is None else f"{value:.{digits}f}"


def roofline(intensity: list[float]) -> tuple[list[float], list[float]]:
    """The roofline's corners (FLOP per byte, TFLOP/s) across `intensity`: the bandwidth roof up to the ridge, where it
    meets the compute roof, flat after."""
    ridge = CEILINGS["bf16"] / CEILINGS["bandwidth"]
    xs = [min(min(intensity), ridge) / 2, ridge, max(max(intensity), ridge) * 2]
    return xs, [min(CEILINGS["bandwidth"] * x, CEILINGS["bf16"]) / 1e12 for x in xs]


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    intensity = [r["tflop_s"] * 1e12 / (r["gb_s"] * 1e9) for r in rows]
    colors = ["tab:red" if r["kv_cache"] == "fp8" else "tab:blue" for r in rows]
    ax.scatter(intensity, [r["tflop_s"] for r in rows], c=colors, s=12)
    ax.plot(*roofline(intensity), "k--", lw=1, label=f"roofline: {CEILINGS['gpu']}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOP per byte")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("flashmla dense decode (blue: BF16 cache, red: FP8 cache)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot(path: Path) -> None:
    """An earlier run's roofline plot again (`path.with_suffix(".png")`), e.g. after a fix to `plot`: the PNGs of
    stops before 48 drew the bandwidth roof without the ridge."""
    results = json.loads(path.read_text())
    CEILINGS.update(results["meta"].get("ceilings", {}))
    plot(results["rows"], path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')} (ceilings: {CEILINGS['gpu']})")


def bench_device(backend: str, script: str, ops: tuple[str, ...] = ()) -> torch.device:
    """The GPU a benchmark runs on, with the ops' backend forced to `backend` (FLASHMLA_BACKEND). A forced `cuda` or
    `triton` that one of `ops` cannot take here (kernels not built, no Triton) stops the benchmark: it would time
    the reference under that name."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    os.environ["FLASHMLA_BACKEND"] = backend
    device = torch.device("cuda")
    if backend in ("cuda", "triton"):
        taken = {op: flashmla_ops.backend(op, device) for op in ops}
        missing = [f"{op} runs {path}" for op, path in taken.items() if path != backend]
        if missing:
            raise SystemExit(f"{script}: --backend {backend}, but here {', '.join(missing)} (see the flashmla_ops "
                             f"warning above)")
    if "H100" not in torch.cuda.get_device_name(device):
        measure_ceilings(device)
    return device


def measure_ceilings(device: torch.device) -> None:
    """CEILINGS on this GPU: a 1 GiB device-to-device copy (read + write counted) and an 8192^3 BF16 matmul, medians."""
    import triton.testing

    source = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: target.copy_(source), return_mode="median")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    matmul_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    CEILINGS.update(gpu=f"{torch.cuda.get_device_name(device)} (measured)",
                    bandwidth=2 * source.numel() / copy_ms * 1e3, bf16=2 * 8192 ** 3 / matmul_ms * 1e3)
    print(f"ceilings on {CEILINGS['gpu']}: copy {CEILINGS['bandwidth'] / 1e9:.0f} GB/s, "
          f"bf16 matmul {CEILINGS['bf16'] / 1e12:.0f} TFLOP/s")
    del source, target, a, b
    torch.cuda.empty_cache()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The repository's commit (with "+changes" when the tree differs from it), where git can tell."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def save_results(prefix: str, backend: str, rows: list[dict], plot_fn, **extra) -> None:
    """`prefix`.json (GPU, torch, Triton, the command line, the checkout's commit, backend, timer, the rows and
    `extra`) and `prefix`.png (`plot_fn(rows, path)`)."""
    out = Path(prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": _version("triton"),
            "command": " ".join(sys.argv), "commit": _commit(), "backend": backend, "timer": TIMER,
            "settle_s": SETTLE_S, "ceilings": CEILINGS}
    json_path, png_path = (out.with_name(out.name + suffix) for suffix in (".json", ".png"))  # keeps dots in `prefix`
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, **extra}, indent=1))
    plot_fn(rows, png_path)
    print(f"wrote {json_path} and {png_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="auto", choices=["auto", "cuda", "triton", "reference"])
    parser.add_argument("--sweep", action="store_true", help="also run the batch/seqlen/h_q/s_q/dtype sweep")
    parser.add_argument("--no-baselines", action="store_true", help="skip the reference and SDPA timings")
    parser.add_argument("--tune", action="store_true", help="time the Triton launch configurations first")
    parser.add_argument("--out", default="bench/decode", help="output prefix for .json and .png")
    parser.add_argument("--rows", default="",
                        help="comma-separated substrings: only the SPEC rows (and skewed row) whose name has one; "
                             "--tune likewise")
    parser.add_argument("--scheduled", action="store_true",
                        help="pass get_mla_metadata's schedule to the op (the CUDA kernel then balances the blocks)")
    parser.add_argument("--replot", metavar="JSON",
                        help="no timing: draw an earlier run's PNG (beside its JSON) again from its rows, against the "
                             "ceilings it recorded (the SPEC.md §4 H100 figures where it recorded none)")
    add_timing_arguments(parser)
    args = parser.parse_args()
    if args.replot:
        replot(Path(args.replot))
        return
    if args.backend == "reference" and args.timer == "graph":
        # the reference dense decode reads cache_seqlens on the host (.tolist()), which a CUDA graph capture refuses
        print("--backend reference: timing with --timer events (the reference cannot be captured in a CUDA graph)")
        args.timer = "events"
    apply_timing_arguments(args)
    device = bench_device(args.backend, "bench_decode.py", ("dense_decode",))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, dense_decode backend: "
          f"{flashmla_ops.backend('dense_decode', device)}, CUDA kernel for 16 rows: {cuda_dense_kernel(16)}")
    chosen = row_filter(args.rows)
    tuned = tune(device, chosen) if args.tune else []
    rows = []
    print(f"{'configuration':26} {'time us':>8} {'GB/s':>7} {'TFLOP/s':>8} {'%BW':>5} {'%MMA':>5} "
          f"{'FlashMLA':>12} {'target':>16} {'vs target':>9} {'x ref':>7} {'x sdpa':>7}")
    bf16_tokens_per_s = {}
    for name, batch, s_q, h_q, seqlen, is_fp8, flashmla, (target, unit) in SPEC_ROWS:
        if not chosen(name):
            continue
        row = bench_config(batch, s_q, h_q, [seqlen] * batch, is_fp8, device, not args.no_baselines, args.scheduled)
        row.update(name=name, flashmla=flashmla, target=f">= {target} {unit}")
        row["tokens_per_s"] = batch * s_q / (row["time_us"] * 1e-6)
        if not is_fp8:
            bf16_tokens_per_s[(batch, s_q, h_q, seqlen)] = row["tokens_per_s"]
        achieved = {"GB/s": row["gb_s"], "TFLOP/s": row["tflop_s"]}.get(unit)
        if achieved is None:  # the FP8 row against this run's BF16 row of the same shape
            bf16 = bf16_tokens_per_s.get((batch, s_q, h_q, seqlen))
            row["bf16_tokens_per_s"] = bf16
            achieved = row["tokens_per_s"] / bf16 if bf16 else None
            if bf16 is None:
                print(f"{name}: no vs target without the BF16 row of its shape in this run (--rows)")
        row["vs_target"] = achieved / target if achieved is not None else None
        rows.append(row)
        print(f"{name:26} {row['time_us']:8.1f} {row['gb_s']:7.0f} {row['tflop_s']:8.1f} "
              f"{100 * row['bandwidth_fraction']:5.1f}"
              f" {100 * row['compute_fraction']:5.1f} {flashmla:>12} {row['target']:>16} {fmt(row['vs_target'], 2):>9}"
              f" {fmt(row.get('speedup_vs_reference'), 1):>7} {fmt(row.get('speedup_vs_sdpa'), 1):>7}"
              f"{clock_note(row)}")
    if chosen("bf16 skewed b32 h16"):
        skewed = bench_config(32, 1, 16, [32768] + [512] * 31, False, device, False, args.scheduled)
        skewed.update(name="bf16 skewed b32 h16", flashmla="-", target="-", vs_target=None)
        rows.append(skewed)
        print(f"{'bf16 skewed b32 h16':26} {skewed['time_us']:8.1f} {skewed['gb_s']:7.0f} {skewed['tflop_s']:8.1f}"
              f"   (one 32k sequence among 31 of 512 tokens){clock_note(skewed)}")
    spec_rows = len(rows)
    if not rows and not args.sweep:
        raise SystemExit(f"bench_decode.py: no row's name has one of --rows {args.rows!r}")
    if args.sweep:
        for batch, s_q, h_q, seqlens, is_fp8 in tqdm(list(sweep_configs()), desc="sweep"):
            rows.append(bench_config(batch, s_q, h_q, seqlens, is_fp8, device, with_baselines=False))
        print(f"{'kv':4} {'batch':>5} {'s_q':>3} {'h_q':>4} {'seqlen':>6} {'skew':>4} {'time us':>9} {'GB/s':>7} "
              f"{'TFLOP/s':>8}")
        for r in rows[spec_rows:]:
            print(f"{r['kv_cache']:4} {r['batch']:5} {r['s_q']:3} {r['h_q']:4} {r['seqlen']:6} "
                  f"{'y' if r['skewed'] else '':>4} "
                  f"{r['time_us']:9.1f} {r['gb_s']:7.0f} {r['tflop_s']:8.1f}{clock_note(r)}")
    save_results(args.out, args.backend, rows, plot, tuning=tuned, cuda_kernel_16_rows=cuda_dense_kernel(16))


if __name__ == "__main__":
    main()
