"""Benchmark end-to-end decoding of random-weight DeepSeek models at real shapes: this project's model (eager, and
its decode step under torch.compile, CUDA graphs on CUDA) against transformers' own DeepSeek model on the same
weights (eager with its dynamic cache, and with its static cache under torch.compile where that works).

Per backend, batch and context it reports prefill tokens/s, time per output token (TPOT), decode tokens/s
(batch / TPOT) and KV-cache bytes per token (all layers, as the backend's cache holds them). Writes JSON and a PNG.

    python scripts/bench_generate.py --model-preset tiny --device cpu             # seconds, any machine
    python scripts/bench_generate.py --model-preset v2-lite --batch 1,16,64 --context 1024,8192,32768
    python scripts/bench_generate.py --model-preset v3-layers --batch 1,64 --context 4096 --profile 64

How the context is filled: each sequence's first `min(context, --prefill-tokens // batch)` tokens (at least 1) go
through a real prefill of random token ids, which is what prefill tokens/s times (after one untimed warm-up
prefill). The rest of the context is random cache content written straight into the caches, the same values for
every backend: for this project, random latents (512), RoPE keys (64) and, for V3.2, indexer keys, written with
`flashmla::write_kv_cache` / `write_index_cache` (so FP8 caches are quantized as in decode); for transformers, the
same values through its cache's `update` (its latent layout, or K/V expanded by the layer's kv_b_proj where the
installed version caches expanded heads) and `update_indexer`. Decode time does not depend on the cache's values
(only on lengths); V3.2's indexer still selects among them. A configuration whose cache or step does not fit is
skipped with the reason printed.

Decode: `--warmup` untimed steps (compilation and CUDA-graph capture happen there), then `--steps` timed steps,
each = advance the cache lengths, one forward, greedy argmax; synchronized before and after on CUDA. The tokens of
every step (greedy from the prefill's last logits) are in the JSON, so backends can be compared token by token.

--profile BATCH runs torch.profiler over a few decode steps of each backend at that batch size, prints the top ops
by self CUDA (or CPU) time and the step's time split into: attention kernels (the flashmla attention ops;
transformers: SDPA / eager attention), the rest of self-attention (projections, RoPE, cache writes), MoE (router,
routed and shared experts), other (dense MLPs, norms, embedding, lm_head, sampling) and, on CUDA, launch gaps (wall
time with no kernel running). A compiled step's kernels are fused and replayed from a CUDA graph, so they cannot be
attributed to modules: its attention kernels are found by name (`flashmla` in the kernel's name), the rest of its
kernel time shows under "other" (the top-ops table names the kernels), its launch gaps as measured.
"""
import argparse
import functools
import gc
import inspect
import json
import math
import re
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from models import (
    DeepseekConfig,
    PagedKVCache,
    compile_decode_step,
    decode_step,
    prefill,
    random_model,
    tiny_config,
)
from models.cache import KV_CACHE_DTYPES
from models.loading import V2_LITE_CONFIG
from models.deepseek import MoE

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
BACKENDS = ("ours-eager", "ours-compiled", "hf-eager", "hf-static-compiled")
PROFILE_STEPS = 3

_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
           num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
           qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
           num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc", scoring_func="sigmoid",
           norm_topk_prob=True, routed_scaling_factor=2.5, rope_theta=10000.0,
           rope_scaling=dict(_YARN, mscale=1.0, mscale_all_dim=1.0), max_position_embeddings=163840,
           rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
           # V3 has 3 dense layers then 58 MoE layers; a 2-layer slice keeps one of each (about 28 GB in BF16,
           # most of it the 256 experts).
           num_hidden_layers=2, first_k_dense_replace=1)
PRESETS = {
    "tiny": tiny_config("deepseek_v3"),
    "tiny-v2": tiny_config("deepseek_v2"),
    "v2-lite": V2_LITE_CONFIG,
    "v3-layers": dict(_V3, model_type="deepseek_v3"),
    "v32-layers": dict(_V3, model_type="deepseek_v32", index_n_heads=64, index_head_dim=128, index_topk=2048),
}


def int_list(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, help="override the preset's num_hidden_layers")
    parser.add_argument("--batch", type=int_list, default=[1, 4], help="comma-separated batch sizes")
    parser.add_argument("--context", type=int_list, default=[64, 256],
                        help="comma-separated context lengths (tokens in the cache before decoding)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first (compile, capture)")
    parser.add_argument("--prefill-tokens", type=int, default=4096,
                        help="tokens prefilled for real (split over the batch); the rest of the context is random "
                        "cache content")
    parser.add_argument("--kv-cache", choices=KV_CACHE_DTYPES, default="bf16",
                        help="this project's cache: bf16, fp8 (656-byte layout), fp32 (exact, with --dtype float32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", type=int, default=0, metavar="BATCH",
                        help="profile a few decode steps of each backend at this batch size (every context)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--balanced", action="store_true",
                        help="our decode steps share one get_mla_metadata split a step (decode_step(balanced=True))")
    parser.add_argument("--out", default="bench/generate", help="output prefix for .json and .png")
    args = parser.parse_args(argv)
    args.backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; choose from {', '.join(BACKENDS)}")
    for name, values, least in (("batch", args.batch, 1), ("context", args.context, 1), ("steps", [args.steps], 1),
                                ("warmup", [args.warmup], 0), ("prefill-tokens", [args.prefill_tokens], 1),
                                ("layers", [1 if args.layers is None else args.layers], 1)):
        if not values or min(values) < least:
            parser.error(f"--{name} must be >= {least}, got {','.join(map(str, values))}")
    if args.profile and args.profile not in args.batch:
        parser.error(f"--profile {args.profile} must be one of --batch {args.batch} (the batch size it profiles)")
    return args


def model_config(args) -> dict:
    config = dict(PRESETS[args.model_preset])
    if args.layers is not None:
        config["num_hidden_layers"] = args.layers
    return config


def raise_recompile_limit() -> None:
    """Every (batch, context) is a new shape for the compiled step: keep them all compiled instead of falling back to
    eager after dynamo's default 8."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> float:
    """Bytes the device can still allocate (CPU: unlimited for this purpose)."""
    if device.type != "cuda":
        return math.inf
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def random_context(config: DeepseekConfig, layer: int, batch: int, start: int, end: int, dtype: torch.dtype,
                   device: torch.device, seed: int):
    """Random cache content of positions `[start, end)` of every sequence in `layer`, the same for every backend:
    latent `(batch, L, kv_lora_rank)` (unit RMS, as after kv_a_layernorm), roped key `(batch, L, qk_rope_head_dim)`,
    and for V3.2 indexer keys `(batch, L, index_head_dim)` (else None)."""
    generator = torch.Generator(device).manual_seed(seed * 1_000_003 + layer)
    shape = (batch, end - start)
    latent = torch.randn(*shape, config.kv_lora_rank, generator=generator, device=device, dtype=dtype)
    k_pe = torch.randn(*shape, config.qk_rope_head_dim, generator=generator, device=device, dtype=dtype)
    index_k = (torch.randn(*shape, config.index_head_dim, generator=generator, device=device, dtype=dtype)
               if config.is_sparse else None)
    return latent, k_pe, index_k


# ---------------------------------------------------------------- backends: prefill, fill, step


class OursRunner:
    """This project's model over a `PagedKVCache` sized for `batch` sequences of `max_seq_len` tokens."""

    def __init__(self, model, batch: int, max_seq_len: int, kv_cache: str, step_fn, device: torch.device):
        self.model, self.batch, self.device = model, batch, device
        blocks_per_seq = -(-max_seq_len // 64)
        self.cache = PagedKVCache(model.config, batch * blocks_per_seq, batch, max_seq_len, kv_cache, device)
        self.step_fn = step_fn

    def kv_bytes_per_token(self) -> int:
        caches = self.cache.kv_cache + (self.cache.index_cache or [])
        return sum(cache[0, 0].nbytes for cache in caches)

    def reset(self) -> None:
        self.cache.reset()

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        return prefill(self.model, self.cache, prompts.tolist())

    def fill(self, start: int, end: int, seed: int) -> None:
        config, cache = self.model.config, self.cache
        slots = torch.tensor([self.cache.extend(seq, end - start) for seq in range(self.batch)],
                             dtype=torch.int64, device=self.device).flatten()
        for layer, kv_cache in enumerate(cache.kv_cache):
            dtype = next(self.model.parameters()).dtype if cache.is_fp8 else kv_cache.dtype
            latent, k_pe, index_k = random_context(config, layer, self.batch, start, end, dtype, self.device, seed)
            torch.ops.flashmla.write_kv_cache(kv_cache, latent.flatten(0, 1), k_pe.flatten(0, 1), slots, cache.is_fp8)
            if index_k is not None:
                index_cache = cache.index_cache[layer]
                index_k = index_k.flatten(0, 1)
                if index_cache.dtype != torch.uint8:
                    index_k = index_k.to(index_cache.dtype)
                torch.ops.flashmla.write_index_cache(index_cache, index_k, slots)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.cache.extend_batch(self.batch, 1)
        return self.step_fn(self.model, self.cache, tokens[:, None])


def hf_model_from(model, config_dict: dict, dtype: torch.dtype, device: torch.device):
    """transformers' DeepSeek model of the same config holding `model`'s weights, copied by name: our stacked
    experts `experts.gate_up_proj` (gate rows then up rows, transformers' layout too) and `experts.down_proj`
    `(E, ...)` go to transformers' tensors of the same names, or to per-expert `experts.{e}.*.weight` in versions that
    keep them."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config_dict)
    with torch.device(device):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    ours = model.state_dict()
    used = set()
    per_expert = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
    with torch.no_grad():
        for name, target in hf.state_dict().items():
            expert = per_expert.match(name)
            if expert is not None and expert["proj"] in ("gate_proj", "up_proj"):
                source = f"{expert['prefix']}.gate_up_proj"
                inter = ours[source].shape[1] // 2
                half = slice(0, inter) if expert["proj"] == "gate_proj" else slice(inter, 2 * inter)
                target.copy_(ours[source][int(expert["expert"]), half])
                used.add(source)
            elif expert is not None:
                source = f"{expert['prefix']}.{expert['proj']}"
                target.copy_(ours[source][int(expert["expert"])])
                used.add(source)
            elif name in ours and ours[name].shape == target.shape:
                target.copy_(ours[name])
                used.add(name)
            else:
                raise ValueError(f"transformers' {name} {tuple(target.shape)} has no counterpart in our model")
    unused = set(ours) - used
    if unused:
        raise ValueError(f"our weights {sorted(unused)[:4]} were not copied to transformers' model")
    return hf


def transformers_rope_order(k_pe: torch.Tensor, config: DeepseekConfig) -> torch.Tensor:
    """A roped key in this project's order, in transformers'. Both regroup an interleaved RoPE's pairs into halves
    before rotating (models.deepseek.apply_rope; transformers' DeepSeek-V3 with `rope_interleave`), except
    transformers' DeepSeek-V2, which rotates adjacent pairs as complex numbers and so caches them adjacent. Real
    tokens are roped by each model in its own order; random cache content must be written in each order too, or the
    two models attend over different keys."""
    if config.model_type != "deepseek_v2" or not config.rope_interleave:
        return k_pe
    first, second = k_pe.chunk(2, dim=-1)
    return torch.stack([first, second], dim=-1).flatten(-2)


class HFRunner:
    """transformers' model with its DynamicCache (eager) or StaticCache (compiled step)."""

    def __init__(self, hf, config: DeepseekConfig, batch: int, max_seq_len: int, compiled: bool,
                 device: torch.device):
        self.hf, self.config, self.batch, self.device = hf, config, batch, device
        self.max_seq_len, self.compiled = max_seq_len, compiled
        # Older transformers take `past_key_values` and `cache_position`; newer ones `cache`, positions from it.
        self.takes_cache_position = "cache_position" in inspect.signature(hf.model.forward).parameters
        self.cache_argument = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        mode = "reduce-overhead" if device.type == "cuda" else None
        self.forward = torch.compile(self._forward, mode=mode) if compiled else self._forward
        self.reset()

    def reset(self) -> None:
        import transformers

        self.cache = (transformers.StaticCache(config=self.hf.config, max_cache_len=self.max_seq_len) if self.compiled
                      else transformers.DynamicCache(config=self.hf.config))
        self.length = 0

    def _forward(self, tokens, position_ids, cache_position):
        extra = {"cache_position": cache_position} if self.takes_cache_position else {}
        extra[self.cache_argument] = self.cache
        out = self.hf(input_ids=tokens, position_ids=position_ids, use_cache=True, logits_to_keep=1, **extra)
        return out.logits[:, -1].float()

    def _positions(self, length: int):
        cache_position = torch.arange(self.length, self.length + length, device=self.device)
        self.length += length
        return cache_position[None].expand(self.batch, -1), cache_position

    def prefill(self, prompts: torch.Tensor) -> torch.Tensor:
        return self._forward(prompts.to(self.device), *self._positions(prompts.shape[1]))

    def kv_bytes_per_token(self) -> int:
        total = 0
        for layer in self.cache.layers:
            for name in ("keys", "values"):
                total += getattr(layer, name)[0, :, 0].nbytes
            if getattr(layer, "indexer_keys", None) is not None:
                total += layer.indexer_keys[0, 0].nbytes
        return total

    def fill(self, start: int, end: int, seed: int) -> None:
        """The random content of `random_context` in transformers' layout: single-head latent + roped key
        `(batch, 1, L, d)`, or keys/values expanded per head by kv_b_proj, whichever this cache holds."""
        config = self.config
        cache_position = torch.arange(start, end, device=self.device)
        for layer_idx, layer in enumerate(self.cache.layers):
            dtype = layer.keys.dtype
            latent, k_pe, index_k = random_context(config, layer_idx, self.batch, start, end, dtype, self.device,
                                                   seed)
            k_pe = transformers_rope_order(k_pe, config)
            if layer.keys.shape[-1] == config.kv_lora_rank and layer.values.shape[-1] == config.qk_rope_head_dim:
                keys, values = latent[:, None], k_pe[:, None]
            elif layer.keys.shape[-1] == config.qk_head_dim and layer.values.shape[-1] == config.v_head_dim:
                kv = self.hf.model.layers[layer_idx].self_attn.kv_b_proj(latent)
                k_nope, values = kv.view(self.batch, end - start, config.num_attention_heads, -1).split(
                    [config.qk_nope_head_dim, config.v_head_dim], dim=-1)
                keys = torch.cat([k_nope, k_pe[:, :, None].expand_as(k_nope[..., :config.qk_rope_head_dim])], -1)
                keys, values = keys.transpose(1, 2), values.transpose(1, 2)
            else:
                raise ValueError(f"transformers' cache layout {tuple(layer.keys.shape)} / {tuple(layer.values.shape)} "
                                 f"is neither latent nor expanded")
            self.cache.update(keys.contiguous(), values.contiguous(), layer_idx, {"cache_position": cache_position})
            if index_k is not None:
                self.cache.update_indexer(index_k.to(layer.indexer_keys.dtype), layer_idx)
        self.length = end

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.compiled and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        return self.forward(tokens[:, None], *self._positions(1))


# ---------------------------------------------------------------- measuring


def estimated_bytes(backend: str, config: DeepseekConfig, batch: int, max_seq_len: int, kv_cache: str,
                    dtype: torch.dtype) -> int:
    """A lower bound of the memory a run needs beyond the weights: its caches, and for transformers the keys and
    values it re-expands per head at every step of every layer (one layer at a time)."""
    element = torch.empty((), dtype=dtype).element_size()
    tokens = batch * (-(-max_seq_len // 64) * 64)
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    per_token = config.num_hidden_layers * (656 if kv_cache == "fp8" else latent * (4 if kv_cache == "fp32" else 2))
    if backend.startswith("hf"):
        per_token = config.num_hidden_layers * latent * element
        expanded = tokens * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) * element
        return tokens * per_token + 2 * expanded
    return tokens * per_token


# flashmla ops and CUDA kernels that write or convert the cache rather than attend: names containing one of these
CACHE_WRITE_NAMES = ("write_kv_cache", "write_index_cache", "quantize")


def is_attention(name: str) -> bool:
    """An attention op or kernel: a flashmla one other than the cache writes, or SDPA (transformers)."""
    return ("flashmla::" in name and not any(part in name for part in CACHE_WRITE_NAMES)
            or "scaled_dot_product" in name)


def step_group(names: list[str]) -> str:
    """The group of a profiled event, from its name and its enclosing ranges' (innermost first). Attention kernels are
    found by name too: a kernel replayed from a compiled step's CUDA graph has no enclosing op or module, and this
    project's kernels are all named `flashmla::...` (the op) or `...flashmla::...kernel...` (the CUDA kernel). Of the
    flashmla ops, the routed experts are MoE and the cache writes the rest of self-attention."""
    if "moe" in names or any("flashmla::routed_experts" in name for name in names):
        return "moe"
    if any(is_attention(name) for name in names):
        return "attention kernels"
    return "attention other" if "self_attn" in names else "other"


def profile_step(runner, tokens: torch.Tensor, steps: int, device: torch.device) -> dict:
    """Profile `steps` decode steps; print the top ops; returns microseconds per step by group."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model = runner.model if isinstance(runner, OursRunner) else runner.hf
    handles = []
    for module in model.modules():
        kind = ("moe" if isinstance(module, MoE) or type(module).__name__.lower().endswith("moe") else
                "self_attn" if type(module).__name__.endswith(("Attention", "MLAttention")) else None)
        if kind is not None:
            ranges = []
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, kind=kind, ranges=ranges: ranges.append(record_function(kind).__enter__())))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, ranges=ranges: ranges.pop().__exit__(None, None, None)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(steps):
                tokens = runner.step(tokens).argmax(-1)
            synchronize(device)
            wall_us = (time.perf_counter() - started) * 1e6
    finally:
        for handle in handles:
            handle.remove()
    on_cuda = device.type == "cuda"
    print(prof.key_averages().table(sort_by="self_device_time_total" if on_cuda else "self_cpu_time_total",
                                    row_limit=12))

    def names(event) -> list[str]:
        chain = []
        while event is not None:
            chain.append(event.name)
            event = event.cpu_parent
        return chain

    groups = dict.fromkeys(("attention kernels", "attention other", "moe", "other"), 0.0)
    for event in prof.events():
        # Ranges (modules, a compiled graph's "## Call CompiledFxGraph ...") span kernels that count themselves.
        if event.name not in ("moe", "self_attn") and not event.name.startswith("## "):
            groups[step_group(names(event))] += event.self_device_time_total if on_cuda else event.self_cpu_time_total
    if on_cuda:  # the GPU idles between kernels while the host launches them (CUDA graphs remove most of it)
        groups["launch gaps"] = max(0.0, wall_us - sum(groups.values()))
    total = sum(groups.values())
    print("  step time by group: " + ", ".join(f"{name} {us / steps:.0f} us ({100 * us / total:.0f}%)"
                                               for name, us in groups.items()))
    return {name: us / steps for name, us in groups.items()}


@torch.inference_mode()
def run_backend(runner, prompts: torch.Tensor, context: int, args, device: torch.device) -> dict:
    batch, prefill_len = prompts.shape
    runner.prefill(prompts)  # warm-up: allocator, kernel JIT
    runner.reset()
    synchronize(device)
    started = time.perf_counter()
    logits = runner.prefill(prompts)
    synchronize(device)
    prefill_seconds = time.perf_counter() - started
    if context > prefill_len:
        runner.fill(prefill_len, context, args.seed)
    tokens = logits.argmax(-1)
    generated = [tokens]
    for _ in range(args.warmup):
        tokens = runner.step(tokens).argmax(-1)
        generated.append(tokens)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(args.steps):
        tokens = runner.step(tokens).argmax(-1)
        generated.append(tokens)
    synchronize(device)
    tpot = (time.perf_counter() - started) / args.steps
    row = {"prefill_tokens": batch * prefill_len, "prefill_seconds": prefill_seconds,
           "prefill_tokens_per_s": batch * prefill_len / prefill_seconds, "tpot_ms": tpot * 1e3,
           "decode_tokens_per_s": batch / tpot, "kv_bytes_per_token": runner.kv_bytes_per_token(),
           "tokens": torch.stack(generated, 1).tolist()}
    if args.profile == batch:
        row["profile_us_per_step"] = profile_step(runner, tokens, PROFILE_STEPS, device)
    return row


def bench(name: str, make_runner, config: DeepseekConfig, args, device: torch.device, dtype: torch.dtype) -> list:
    rows = []
    configs = [(batch, context) for batch in args.batch for context in args.context]
    for batch, context in tqdm(configs, desc=name, leave=False):
        row = {"backend": name, "batch": batch, "context": context, "kv_cache": args.kv_cache if name.startswith(
            "ours") else str(dtype).removeprefix("torch."), "status": "ok"}
        max_seq_len = context + args.warmup + args.steps + 1 + (PROFILE_STEPS if args.profile == batch else 0)
        need = estimated_bytes(name, config, batch, max_seq_len, args.kv_cache, dtype)
        if need > 0.9 * free_memory(device):
            row["status"] = f"skipped: needs about {need / 2 ** 30:.1f} GiB, {free_memory(device) / 2 ** 30:.1f} free"
        else:
            prefill_len = max(1, min(context, args.prefill_tokens // batch))
            generator = torch.Generator().manual_seed(args.seed + batch)
            prompts = torch.randint(2, config.vocab_size, (batch, prefill_len), generator=generator)
            runner = None
            try:
                runner = make_runner(batch, max_seq_len)
                row.update(run_backend(runner, prompts, context, args, device))
            except torch.OutOfMemoryError:
                row["status"] = "skipped: out of memory"
            except Exception as error:  # noqa: BLE001 (a backend that does not run here: reported, the rest go on)
                row["status"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            del runner
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row["status"] != "ok":
            print(f"{name} batch {batch} context {context}: {row['status']}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------- output


def print_table(rows: list) -> None:
    print(f"{'backend':19} {'batch':>5} {'context':>7} {'kv':>8} {'prefill tok/s':>13} {'TPOT ms':>9} "
          f"{'decode tok/s':>12} {'KV B/token':>10}  status")
    for r in rows:
        if r["status"] == "ok":
            print(f"{r['backend']:19} {r['batch']:5} {r['context']:7} {r['kv_cache']:>8} "
                  f"{r['prefill_tokens_per_s']:13.0f} {r['tpot_ms']:9.2f} {r['decode_tokens_per_s']:12.1f} "
                  f"{r['kv_bytes_per_token']:10}  ok")
        else:
            print(f"{r['backend']:19} {r['batch']:5} {r['context']:7} {r['kv_cache']:>8} {'-':>13} {'-':>9} {'-':>12} "
                  f"{'-':>10}  {r['status']}")


def compiled_speedups(rows: list) -> list:
    """ours-compiled's decode speed over each other backend's, per (batch, context) where both ran; printed."""
    ok = {(r["backend"], r["batch"], r["context"]): r for r in rows if r["status"] == "ok"}
    speedups = []
    for (backend, batch, context), row in ok.items():
        if backend != "ours-compiled":
            continue
        entry = {"batch": batch, "context": context}
        for other in BACKENDS:
            if other != "ours-compiled" and (other, batch, context) in ok:
                entry[other] = ok[(other, batch, context)]["tpot_ms"] / row["tpot_ms"]
        speedups.append(entry)
    others = [b for b in BACKENDS if b != "ours-compiled"]
    print("ours-compiled decode speed-up (TPOT ratio) over: " + ", ".join(others))
    for entry in speedups:
        print(f"  batch {entry['batch']:3} context {entry['context']:6}: " + ", ".join(
            f"{other} {entry[other]:.2f}x" if other in entry else f"{other} -" for other in others))
    return speedups


def plot(rows: list, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch in sorted({r["batch"] for r in rows}):
        for backend, style in zip(BACKENDS, ("-o", "-s", "--^", "--v")):
            points = sorted((r["context"], r) for r in rows if r["batch"] == batch and r["backend"] == backend
                            and r["status"] == "ok")
            if points:
                label = f"{backend} b{batch}"
                axes[0].plot([c for c, _ in points], [r["decode_tokens_per_s"] for _, r in points], style, label=label)
                axes[1].plot([c for c, _ in points], [r["tpot_ms"] for _, r in points], style, label=label)
    for ax, ylabel in zip(axes, ("decode tokens/s", "time per output token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Runs the command line `argv` (default: sys.argv); returns what it writes as JSON."""
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    raise_recompile_limit()
    config_dict = model_config(args)
    config = DeepseekConfig.from_dict(config_dict)
    with tqdm(total=1, desc=f"random {args.model_preset} model") as progress:
        # std 0.02 at real widths (as DeepSeek's init) keeps the activations finite in BF16; 0.1 at the tiny one.
        model = random_model(config, dtype, device, seed=args.seed, std=0.02 if config.hidden_size > 1024 else 0.1)
        progress.update()
    parameters = sum(p.numel() for p in model.parameters())
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"{args.model_preset}: {config.num_hidden_layers} layers, {parameters / 1e9:.2f}B parameters, "
          f"{args.dtype}, {device}{gpu}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, png_path = (out.with_name(out.name + suffix) for suffix in (".json", ".png"))  # keeps dots in --out
    rows = []
    meta = {"preset": args.model_preset, "config": config_dict, "dtype": args.dtype, "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "torch": torch.__version__,
            "steps": args.steps, "warmup": args.warmup, "prefill_tokens": args.prefill_tokens, "balanced": args.balanced}

    def save_so_far() -> None:  # after each backend, in case a later one dies
        json_path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))

    for name in (b for b in args.backends if b.startswith("ours")):
        # One compiled step for every configuration: the cache's sizes are symbolic, so it compiles about twice.
        step_fn = (compile_decode_step(device, args.balanced) if name == "ours-compiled"
                   else functools.partial(decode_step, balanced=args.balanced))
        rows += bench(name, lambda batch, max_seq_len, step_fn=step_fn: OursRunner(
            model, batch, max_seq_len, args.kv_cache, step_fn, device), config, args, device, dtype)
        save_so_far()
    hf_backends = [b for b in args.backends if b.startswith("hf")]
    if hf_backends:
        import transformers

        meta["transformers"] = transformers.__version__
        try:
            hf = hf_model_from(model, config_dict, dtype, device)
        except Exception as error:  # noqa: BLE001 (e.g. a model_type this transformers lacks: reported)
            hf = None
            reason = f"skipped: transformers' model: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(reason)
            rows += [{"backend": name, "batch": batch, "context": context, "kv_cache": args.dtype, "status": reason}
                     for name in hf_backends for batch in args.batch for context in args.context]
        del model
        gc.collect()
        if hf is not None:
            meta["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
            meta["hf_attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
            for name in hf_backends:
                compiled = name == "hf-static-compiled"
                rows += bench(name, lambda batch, max_seq_len, compiled=compiled: HFRunner(
                    hf, config, batch, max_seq_len, compiled, device), config, args, device, dtype)
                save_so_far()
    print_table(rows)
    speedups = compiled_speedups(rows)
    meta["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    meta["compiled_graphs"] = counters["stats"]["unique_graphs"]
    print(f"CUDA graphs skipped: {meta['cudagraph_skips']}, graphs compiled: {meta['compiled_graphs']}")
    result = {"meta": meta, "rows": rows, "speedups": speedups}
    json_path.write_text(json.dumps(result, indent=1))
    plot(rows, f"{args.model_preset} ({config.num_hidden_layers} layers), {args.dtype}, {device}", png_path)
    print(f"wrote {json_path} and {png_path}")
    return result


if __name__ == "__main__":
    main()
