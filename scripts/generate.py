"""Generate text (or tokens) with a DeepSeek V2 / V3 / V3.2 checkpoint over the paged MLA cache.

    python scripts/generate.py --prompt "And God said," --kv-cache fp8     # the shipped tiny V3.2 checkpoint
    python scripts/generate.py --model DIR --prompt "Hello" --prompt "The capital of France is" --max-new-tokens 32
    python scripts/generate.py --random-tiny v32 --kv-cache fp8 --compile    # no checkpoint: a tiny random model
    torchrun --nproc-per-node 2 scripts/generate.py --model DIR --tp 2 --ep 2  # tensor + expert parallel
    python scripts/generate.py --model DIR --prompt-ids 5,6,7,8 --greedy --dtype float32 --kv-cache fp32  # exact check
    python scripts/generate.py --prompt "And God said," --then " And Moses said,"   # a second turn on the same cache

--model defaults to the shipped checkpoint (models/assets/deepseek-v32-tiny-kjv) where it exists. Without --prompt or
--prompt-ids a checkpoint with tokenizer files gets the two sample prompts (models.data.SAMPLE_PROMPTS); with
--random-tiny (or without that checkpoint, or a checkpoint without a tokenizer), a tiny random model of that family
runs on fixed token prompts.
With --tp N (under torchrun, N processes: one per GPU over NCCL, or CPU processes over gloo) each rank loads only its
part of the weights (models/parallel.py); rank 0 prints what one process would.

--dtype float32 with --kv-cache fp32 is the exact reference path (every op in float32, slow on a GPU): its greedy
tokens are those of transformers' own `generate(..., do_sample=False)` on the same checkpoint (tests/models/
test_generate_script.py). --dtype bfloat16 (the default) with --kv-cache bf16 or fp8 is the fast path.

--then TEXT (or --then-ids with --prompt-ids; repeat for more turns) continues every conversation: its tokens follow
each reply in the cache (`models.generation.prefill` continues the rows), and the model replies again.
"""
import argparse
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from models import (SHIPPED_CHECKPOINT, DeepseekConfig, PagedKVCache, compile_decode_step, decode_step, generate,
                    load_model, load_tokenizer, random_model, tiny_config)
from models.cache import KV_CACHE_DTYPES
from models.data import SAMPLE_PROMPTS
from models.loading import has_tokenizer, load_config
from models.parallel import end_job, init_parallel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}
RANDOM_TINY = {"v2": "deepseek_v2", "v3": "deepseek_v3", "v32": "deepseek_v32"}


def prompt_ids(text: str) -> list[int]:
    """`--prompt-ids` "5,6,7" -> [5, 6, 7]."""
    try:
        ids = [int(token) for token in text.split(",") if token.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one token id")
    return ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer files); default: "
                        "the shipped tiny checkpoint")
    parser.add_argument("--random-tiny", choices=sorted(RANDOM_TINY),
                        help="run a tiny random model of this family instead of a checkpoint")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); needs a tokenizer")
    prompts.add_argument("--prompt-ids", action="append", type=prompt_ids, metavar="ID,ID,...",
                         help="a prompt as comma-separated token ids (repeat for a batch); no tokenizer needed")
    turns = parser.add_mutually_exclusive_group()
    turns.add_argument("--then", action="append", default=[], metavar="TEXT",
                       help="a next turn after every reply (repeat for more turns); needs --prompt")
    turns.add_argument("--then-ids", action="append", default=[], type=prompt_ids, metavar="ID,ID,...",
                       help="a next turn as token ids (repeat for more turns); not with --prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per turn")
    parser.add_argument("--samples", type=int, default=1,
                        help="continuations of each prompt (cache rows sharing the prompt's blocks); use with "
                        "--temperature")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0; the default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="bf16",
                        help="bf16 (fast kernels), fp8 (656-byte FP8 layout), or fp32 (exact reference path, for "
                        "checking a --dtype float32 model)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16",
                        help="model weights and activations (fp32, bf16: aliases)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile(fullgraph=True) the decode step (CUDA graphs on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, choices=(0, 1), default=1,
                        help="1: run a short untimed generation first so that compile/JIT time is not reported")
    parser.add_argument("--tp", type=int, default=1,
                        help="tensor-parallel ranks: heads, MLPs and vocabulary split over torchrun's TP processes")
    parser.add_argument("--ep", type=int, default=1,
                        help="1 (routed experts split like the MLPs) or TP (experts partitioned over the same ranks)")
    args = parser.parse_args(argv)
    if args.greedy and args.temperature != 0:
        parser.error(f"--greedy means temperature 0, got --temperature {args.temperature}")
    if args.ep not in (1, args.tp):
        parser.error(f"--ep must be 1 or --tp ({args.tp}), got {args.ep}")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be a torch device (cpu, cuda, cuda:1, ...), got {args.device!r}")
    if not -2 ** 63 <= args.seed < 2 ** 64:  # what torch.manual_seed takes
        parser.error(f"--seed must be in [-2**63, 2**64), got {args.seed}")
    if any(not text for text in args.then):
        parser.error("--then: a turn needs text (an empty one would only cache the reply's last token)")
    # what generate() would refuse, said before the model is loaded
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or math.isinf(args.temperature):
        parser.error(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    if args.model and args.random_tiny:
        parser.error("--model and --random-tiny exclude each other")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face DeepSeek checkpoint directory)")
    if args.tp > 1 and "WORLD_SIZE" not in os.environ:
        parser.error(f"--tp {args.tp} runs one process per rank: start it with torchrun --nproc-per-node {args.tp}")
    if args.tp == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run (and print) it all
        parser.error(f"under torchrun with {os.environ['WORLD_SIZE']} processes, give --tp {os.environ['WORLD_SIZE']} "
                     f"(and --ep): without it every process runs the whole model")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU (torch {torch.__version__})")
    if args.prompt_ids and min(min(ids) for ids in args.prompt_ids) < 0:
        parser.error("--prompt-ids: token ids must be >= 0")
    if args.then_ids and min(min(ids) for ids in args.then_ids) < 0:
        parser.error("--then-ids: token ids must be >= 0")
    if args.then and args.prompt_ids:
        parser.error("--then takes text: with --prompt-ids give the next turns as --then-ids")
    if args.then_ids and args.prompt:
        parser.error("--then-ids takes token ids: with --prompt give the next turns as --then")
    if not args.model and not args.random_tiny:
        if SHIPPED_CHECKPOINT.exists():
            args.model = str(SHIPPED_CHECKPOINT)
        else:
            args.random_tiny = "v3"
    if args.model and not args.prompt and not args.prompt_ids and has_tokenizer(args.model):
        args.prompt = list(SAMPLE_PROMPTS)
    return args


def main(argv: list[str] | None = None) -> list[list[int]]:
    """Runs the command line `argv` (default: sys.argv); returns each prompt's new token ids (of the last turn)."""
    args = parse_args(argv)
    parallel, device = (init_parallel(args.tp, args.ep, torch.device(args.device).type) if args.tp > 1
                        else (None, torch.device(args.device)))
    is_main = parallel is None or parallel.rank == 0
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    tokenizer = None
    if args.model:
        config, _ = load_config(args.model)
        tokenizer = load_tokenizer(args.model) if args.prompt else None
    else:
        config = DeepseekConfig.from_dict(tiny_config(RANDOM_TINY[args.random_tiny]))
    if args.prompt:
        if tokenizer is None:
            raise SystemExit("--prompt needs a checkpoint with tokenizer files (--model DIR)")
        prompts = [tokenizer.encode(p) for p in args.prompt]
    elif args.prompt_ids:
        prompts = args.prompt_ids
    else:
        prompts = [list(range(2, 2 + length)) for length in (7, 19, 4)]  # tokenizer-free input
    prompts = [prompt for prompt in prompts for _ in range(args.samples)]  # rows of one prompt share its blocks
    if args.then and tokenizer is None:
        raise SystemExit("--then needs a checkpoint with tokenizer files (--model DIR)")
    turns = [tokenizer.encode(text, add_special_tokens=False) for text in args.then] if args.then else args.then_ids
    # what generate() would refuse, said before the weights load
    largest = max((token for p in [*prompts, *turns] for token in p), default=0)
    if largest >= config.vocab_size:
        raise SystemExit(f"prompt token ids must be below the model's vocab_size ({config.vocab_size}), got {largest}")
    # each turn: its tokens, and the replies before it (a reply's last token is cached with the next turn; the last
    # turn's, returned, is not)
    max_seq_len = (max(len(p) for p in prompts) + sum(len(t) for t in turns)
                   + (len(turns) + 1) * args.max_new_tokens - 1)
    if max_seq_len > config.max_position_embeddings:
        raise SystemExit(f"the longest prompt ({max(len(p) for p in prompts)} tokens), {len(turns)} more turns and "
                         f"--max-new-tokens {args.max_new_tokens} make up to {max_seq_len} positions, more than the "
                         f"model's max_position_embeddings ({config.max_position_embeddings})")
    if args.model:
        with tqdm(total=1, desc=f"loading {args.model}", disable=not is_main) as progress:
            model = load_model(args.model, dtype, device, parallel)
            progress.update()
        if tokenizer is None:
            tokenizer = load_tokenizer(args.model)
    else:
        model = random_model(config, dtype, device, seed=args.seed, parallel=parallel)

    blocks_per_seq = -(-max_seq_len // 64)
    cache = PagedKVCache(config, blocks_per_seq * len(prompts), len(prompts), max_seq_len, args.kv_cache, device)
    step = compile_decode_step(device) if args.compile else decode_step
    generator = torch.Generator(device).manual_seed(args.seed)
    if args.warmup:  # compilation, CUDA-graph capture and kernel JIT stay out of the timed run
        generate(model, cache, prompts, min(4, args.max_new_tokens), 0.0, 1.0, (), step)
        cache.reset()
    outputs: list[list[int]] = []
    for turn in [None, *turns]:
        if turn is not None:  # each conversation's last reply token, then the turn's tokens
            prompts = [[output[-1], *turn] for output in outputs]
        outputs, stats = generate(model, cache, prompts, args.max_new_tokens, args.temperature, args.top_p,
                                  tuple(config.eos_token_ids), step, generator)
        if is_main:
            for prompt, output in zip(prompts, outputs):
                shown = prompt if turn is None else prompt[1:]  # the reply's last token was shown with it
                if tokenizer is not None:
                    print(repr(tokenizer.decode(shown)), "->", repr(tokenizer.decode(output)))
                else:
                    print(shown, "->", output)
            print(f"prefill {stats.prefill_seconds * 1e3:.1f} ms, decode {stats.new_tokens} tokens in "
                  f"{stats.decode_seconds:.2f} s: {stats.decode_tokens_per_second:.1f} tokens/s "
                  f"({'compiled' if args.compile else 'eager'}, {args.kv_cache} cache, {device}, "
                  f"tp {args.tp}, ep {args.ep})")
    if parallel is not None:
        end_job()
    return outputs


if __name__ == "__main__":
    main()
