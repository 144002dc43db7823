"""Decode tokens/s of a DeepSeek-V2-Lite-shaped random model on one GPU (tp 1) and over tensor (+ expert) parallel
ranks, and whether the two generate the same tokens.

    torchrun --nproc-per-node 2 scripts/bench_parallel.py                           # tp 1 (rank 0), then tp 2
    torchrun --nproc-per-node 2 scripts/bench_parallel.py --ep 2 --out bench/parallel_ep2
    torchrun --nproc-per-node 2 scripts/bench_parallel.py --device cpu --layers 2 --batch 1 --new-tokens 4  # smoke

Rank 0 first runs the whole model alone while the other ranks wait, then every rank runs its part of the same model
(`random_model(parallel=...)` draws each matrix whole and keeps the rank's part). Per batch size: prompts of
--prompt-len random tokens, one untimed generation (compiles and captures the CUDA graphs), then a timed one of
--new-tokens tokens; tokens/s counts decode steps only, as `generate` reports them. Rank 0 prints a table and writes
JSON and a PNG of tokens/s against batch size, with, per batch, the share of greedy tokens equal to tp 1's and the
largest relative difference of the last prompt tokens' logits (bf16 weights: the ranks' partial sums add in another
order, so ~1e-2 is expected, and where a random model's top two logits nearly tie the greedy tokens may part ways).
With experts gathered per token (batch * 6 <= 64 experts), decode compiles as one graph: batch sizes up to 10.
"""
import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from models import DeepseekConfig, PagedKVCache, compile_decode_step, decode_step, generate, prefill, random_model
from models.cache import KV_CACHE_DTYPES
from models.loading import V2_LITE_CONFIG
from models.parallel import end_job, init_parallel


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=1, help="1 (experts split like the MLPs) or the number of ranks")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=V2_LITE_CONFIG["num_hidden_layers"],
                        help="fewer layers for a quicker run (decode time is about proportional)")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="bf16")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="torch.compile(fullgraph=True) the decode step (CUDA graphs on CUDA)")
    parser.add_argument("--out", default="bench/parallel", help="writes OUT.json and OUT.png")
    args = parser.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.ep not in (1, world_size):
        parser.error(f"--ep must be 1 or the number of ranks ({world_size}), got {args.ep}")
    for name, values, least in (("batch", args.batch, 1), ("prompt-len", [args.prompt_len], 1),
                                ("new-tokens", [args.new_tokens], 2), ("layers", [args.layers], 1)):
        if min(values) < least:  # new tokens: the first comes from prefill, the rest are the timed decode
            parser.error(f"--{name} must be >= {least}, got {','.join(map(str, values))}")
    return args


def measure(model, config: DeepseekConfig, batch: int, args, device: torch.device) -> dict:
    """Greedy tokens, decode tokens/s and the prompts' last-token logits of one batch size."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_len), generator=generator).tolist()
    max_seq_len = args.prompt_len + args.new_tokens
    cache = PagedKVCache(config, batch * -(-max_seq_len // 64), batch, max_seq_len, args.kv_cache, device)
    step = compile_decode_step(device) if args.compile else decode_step

    # warm-up: compiles, captures CUDA graphs; no EOS stop in either run (a fixed number of steps is timed)
    generate(model, cache, prompts, args.new_tokens, step=step, eos_token_ids=())
    cache.reset()
    tokens, stats = generate(model, cache, prompts, args.new_tokens, step=step, eos_token_ids=())
    cache.reset()
    with torch.inference_mode():
        logits = prefill(model, cache, prompts).cpu()
    cache.reset()
    return {"tokens": tokens, "tokens_per_second": stats.decode_tokens_per_second, "logits": logits}


def run_all(model, config, args, device, progress_desc: str, is_main: bool) -> dict[int, dict]:
    results = {}
    for batch in tqdm(args.batch, desc=progress_desc, disable=not is_main):
        results[batch] = measure(model, config, batch, args, device)
    return results


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tp in sorted({row["tp"] for row in rows}):
        mine = [row for row in rows if row["tp"] == tp]
        ax.plot([row["batch"] for row in mine], [row["tokens_per_second"] for row in mine], "o-",
                label=f"tp {tp}, ep {mine[0]['ep']}")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("DeepSeek-V2-Lite-shaped decode")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    args = parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # The other ranks wait in a barrier while rank 0 runs the one-process pass (minutes of compiling and capturing at
    # full width): longer than NCCL's default 10-minute collective timeout allows.
    parallel, device = (init_parallel(world_size, args.ep, torch.device(args.device).type,
                                      timeout=datetime.timedelta(hours=2)) if world_size > 1
                        else (None, torch.device(args.device)))
    is_main = parallel is None or parallel.rank == 0
    config = DeepseekConfig.from_dict({**V2_LITE_CONFIG, "num_hidden_layers": args.layers})
    dtype = DTYPES[args.dtype]

    single = {}
    if is_main:
        started = time.perf_counter()
        model = random_model(config, dtype, device, std=0.02)
        print(f"tp 1: random weights in {time.perf_counter() - started:.1f} s")
        single = run_all(model, config, args, device, "tp 1", is_main)
        del model
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [{"tp": 1, "ep": 1, "batch": batch, "tokens_per_second": result["tokens_per_second"]}
            for batch, result in single.items()]
    if parallel is not None:
        dist.barrier()
        model = random_model(config, dtype, device, std=0.02, parallel=parallel)
        sharded = run_all(model, config, args, device, f"tp {world_size}", is_main)
        for batch, result in sharded.items():
            reference = single.get(batch)
            row = {"tp": world_size, "ep": args.ep, "batch": batch, "tokens_per_second": result["tokens_per_second"]}
            if reference is not None:
                same = sum(a == b for ours, theirs in zip(result["tokens"], reference["tokens"])
                           for a, b in zip(ours, theirs))
                row["greedy_tokens_equal"] = same / sum(len(tokens) for tokens in reference["tokens"])
                scale = reference["logits"].abs().amax(-1)
                row["logits_max_relative_difference"] = (
                    ((result["logits"] - reference["logits"]).abs().amax(-1) / scale).max().item())
            rows.append(row)

    if is_main:
        for row in rows:
            print("  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in row.items()))
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        settings = {key: value for key, value in vars(args).items() if key != "out"}
        json_path, png_path = (out.with_name(out.name + suffix) for suffix in (".json", ".png"))  # keeps dots
        json_path.write_text(json.dumps(
            {"device": device_name, "world_size": world_size, "settings": settings, "config": config.__dict__,
             "results": rows}, indent=2))
        plot(rows, png_path)
        print(f"wrote {json_path} and {png_path}")
    if parallel is not None:
        end_job()


if __name__ == "__main__":
    main()
