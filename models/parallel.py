"""Tensor and expert parallelism for the DeepSeek model over torch.distributed: one process per device (`torchrun`),
NCCL on `cuda:LOCAL_RANK`, gloo on CPU. The `tp` processes of the job are one group; rank r holds:

- MLA: query heads `[r H/tp, (r+1) H/tp)`: its rows of `q_proj` / `q_b_proj` and `kv_b_proj` and its columns of
  `o_proj`. What leads to the latent (`q_a_proj`, `kv_a_proj_with_mqa`, their norms) is replicated, so every rank
  writes the same latent cache (replicated, as for MQA) and runs the prefill / decode ops on its own heads; the
  partial sums of `o_proj` are all-reduced.
- V3.2's lightning indexer: replicated. It is small next to attention (one 128-d key per token; a 64 x 128 query from
  the compressed query), and replicated it needs no collective and picks the same top-k on every rank, since every
  rank sees bitwise the same input (the all-reduce hands all ranks the same sum).
- Dense MLP and shared experts: `gate_proj` / `up_proj` rows (column parallel), `down_proj` columns (row parallel).
- Routed experts: the router is replicated. With `ep` 1 every expert is split by its intermediate dimension like the
  MLP; with `ep` = `tp` (expert parallelism over the same ranks) rank r holds whole experts `[r E/ep, (r+1) E/ep)`.
  Every token is already on every rank (attention's all-reduce replicates the activations: the all-gather of tokens
  is free), so each rank runs its experts on the tokens that chose them and the MoE layer's partial sums (routed and
  shared experts together) are all-reduced once.
- Embedding and LM head: vocabulary rows `[r V', (r+1) V')`, `V' = ceil(V / tp)` (the last rank's rows past V are
  zero padding). The embedding looks up the ids it holds (0 for the others) and all-reduces; the LM head's logits are
  all-gathered to every rank, so greedy decoding picks the same token everywhere (sampled tokens are broadcast from
  rank 0 by `generation.generate`).

Per layer that is two all-reduces of `(T, hidden)`, plus one all-gather of the logits per step. The collectives are
the functional ones (`torch.distributed._functional_collectives`), so `torch.compile(fullgraph=True)` of the decode
step traces them (Inductor lowers them to the process group's collectives).

`shard_model` turns a model on the meta device into this rank's part and records in `Parallel.splits` which part of
each full weight that is; `models.loading` reads only those parts from the checkpoint.
"""
import datetime
import os
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .deepseek import MLP, DeepseekConfig, DeepseekForCausalLM, Experts, MoE

# torch >= 2.6 names the dim-0 all-gather all_gather_single (all_gather_tensor is deprecated there)
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass(frozen=True)
class Split:
    """The part of a full weight one rank holds: `[start, stop)` of dimension `dim`, whose full size is `size`. The
    rank's tensor may be longer than `stop - start` along `dim`: the vocabulary's zero padding."""
    dim: int
    start: int
    stop: int
    size: int


@dataclass(eq=False)
class Parallel:
    """Rank `rank` of the `tp_size` ranks of `group`, which split attention heads, MLPs and the vocabulary, and with
    `ep_size` = `tp_size` the routed experts (`ep_size` 1: experts split like the MLPs). `splits`: model parameter
    name -> `Split`, for the parameters this rank holds part of (filled by `shard_model`)."""
    tp_size: int
    ep_size: int
    rank: int
    group: dist.ProcessGroup
    splits: dict[str, Split] = field(default_factory=dict)

    def __post_init__(self):
        if self.ep_size not in (1, self.tp_size):
            raise ValueError(f"ep must be 1 or tp ({self.tp_size}: expert parallelism over the same ranks), "
                             f"got {self.ep_size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x `(n, ...)` -> `(tp_size * n, ...)`, rank 0's rows first."""
        return _all_gather(x, 0, self.group)

    def broadcast(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rank 0's `tokens` on every rank (contiguous: NCCL broadcasts in place into dense memory)."""
        tokens = tokens.contiguous()
        dist.broadcast(tokens, 0, self.group)
        return tokens


def init_parallel(tp_size: int, ep_size: int = 1, device_type: str = "cpu",
                  timeout: datetime.timedelta | None = None) -> tuple[Parallel, torch.device]:
    """Join the job that `torchrun` (or a test's spawn) started: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
    LOCAL_RANK come from the environment, and the whole world is the tensor-parallel group (WORLD_SIZE = tp_size).
    Returns this rank's `Parallel` and device: `cuda:LOCAL_RANK` over NCCL, or the CPU over gloo. `timeout`: how long
    a collective may wait before the job is torn down (the backend's default: 10 minutes for NCCL, 30 for gloo)."""
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if not dist.is_initialized():
        options = {} if timeout is None else {"timeout": timeout}
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, **options)
        else:
            dist.init_process_group("gloo", **options)
    world_size = dist.get_world_size()
    if world_size != tp_size:
        raise ValueError(f"tp {tp_size} needs as many processes (torchrun --nproc-per-node {tp_size}), "
                         f"got WORLD_SIZE {world_size}")
    return Parallel(tp_size, ep_size, dist.get_rank(), dist.group.WORLD), device


def end_job() -> None:
    """Wait for every rank, leave the process group and end this process, without finalizing the interpreter.

    Functional collectives keep the process group alive past `destroy_process_group` (torch 2.13: a reference stays
    on the C++ side), and gloo's worker threads free a collective's tensors only after it has completed. A worker
    that does so while the interpreter finalizes needs the GIL, cannot take it, and aborts the process ("terminate
    called without an active exception", SIGABRT; pytorch/pytorch#179291). `os._exit`, output flushed, skips the
    finalization."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RowParallelLinear(nn.Linear):
    """`y = sum_r x_r W_r^T + b`: this rank holds the columns `W_r` of its input features; partial sums all-reduced."""

    def __init__(self, in_features: int, out_features: int, bias: bool, parallel: Parallel):
        super().__init__(in_features, out_features, bias=bias)
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.parallel.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """This rank's `ceil(vocab / tp)` rows of the embedding; other ids look up 0, and the sum over ranks is the row."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel):
        rows = -(-vocab_size // parallel.tp_size)
        super().__init__(rows, hidden_size)
        self.vocab_start = parallel.rank * rows
        self.parallel = parallel

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.vocab_start
        held = (local_ids >= 0) & (local_ids < self.num_embeddings)
        x = F.embedding(local_ids.clamp(0, self.num_embeddings - 1), self.weight)
        return self.parallel.all_reduce(x.masked_fill(~held[..., None], 0))


class VocabParallelLMHead(nn.Linear):
    """This rank's `ceil(vocab / tp)` rows of the LM head; logits all-gathered to every rank."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel: Parallel):
        super().__init__(hidden_size, -(-vocab_size // parallel.tp_size), bias=False)
        self.vocab_size = vocab_size
        self.parallel = parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x `(T, hidden)` -> logits `(T, vocab)`."""
        logits = F.linear(x, self.weight)  # (T, vocab / tp): gathered along the vocabulary as (vocab / tp, T) blocks
        # A contiguous tensor, as one process's logits: not a transposed view of the gathered blocks, nor (outside
        # inference mode) the functional collective's AsyncCollectiveTensor, which torch.load refuses by default.
        # clone, not contiguous(): a view that is contiguous already (one row) would come back as it is.
        gathered = self.parallel.all_gather(logits.T.contiguous()).T[:, :self.vocab_size]
        return gathered.clone(memory_format=torch.contiguous_format)


class ParallelMoE(MoE):
    """Routed experts split by expert (`ep` = `tp`) or by intermediate dimension (`ep` 1), shared experts by
    intermediate dimension: each rank's output is a partial sum of the layer's, all-reduced once."""

    def __init__(self, config: DeepseekConfig, parallel: Parallel):
        super().__init__(config)
        self.parallel = parallel
        num_experts, hidden, inter = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        if parallel.ep_size > 1:
            num_experts //= parallel.ep_size
        else:
            inter //= parallel.tp_size
        self.experts = Experts(config, num_experts, inter)
        if parallel.ep_size > 1:
            self.experts.first_expert = parallel.rank * num_experts
        if self.shared_experts is not None:
            shared_intermediate = config.moe_intermediate_size * config.n_shared_experts
            self.shared_experts = MLP(hidden, shared_intermediate // parallel.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.parallel.all_reduce(super().forward(x))


def _check_divisible(config: DeepseekConfig, parallel: Parallel) -> None:
    """The sizes this rank's model splits, those of MLP kinds it has only (an all-MoE model has no dense MLP)."""
    tp, ep = parallel.tp_size, parallel.ep_size
    moe_layers = [config.is_moe_layer(layer) for layer in range(config.num_hidden_layers)]
    sizes = {"num_attention_heads": (config.num_attention_heads, tp)}
    if not all(moe_layers):
        sizes["intermediate_size"] = (config.intermediate_size, tp)
    if any(moe_layers) and config.n_routed_experts:
        sizes["n_routed_experts"] = (config.n_routed_experts, ep)
        sizes["moe_intermediate_size"] = (config.moe_intermediate_size, 1 if ep > 1 else tp)
        sizes["moe_intermediate_size * n_shared_experts"] = (
            config.moe_intermediate_size * (config.n_shared_experts or 0), tp)
    for name, (size, parts) in sizes.items():
        if size % parts:
            raise ValueError(f"{name} ({size}) does not split into {parts} equal parts (tp {tp}, ep {ep})")


def shard_model(model: DeepseekForCausalLM, parallel: Parallel) -> None:
    """Make `model`, on the meta device (built under the default dtype of its weights), rank `parallel.rank`'s part
    (see the module docstring); fill `parallel.splits` and set `model.parallel`. Splits are equal (vocabulary:
    padded): with DeepSeek's sizes (heads x 192 / 256 / 128, intermediate sizes multiples of 128 x tp) they fall on
    the FP8 weights' 128-blocks."""
    config, tp = model.config, parallel.tp_size
    _check_divisible(config, parallel)
    full_shapes = {name: tensor.shape for name, tensor in model.state_dict(keep_vars=True).items()}
    hidden = config.hidden_size
    model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, hidden, parallel)
    model.lm_head = VocabParallelLMHead(hidden, config.vocab_size, parallel)
    for layer in model.model.layers:
        attention = layer.self_attn
        attention.num_heads = config.num_attention_heads // tp
        for name in ("q_proj" if config.q_lora_rank is None else "q_b_proj", "kv_b_proj"):
            linear = getattr(attention, name)
            setattr(attention, name, nn.Linear(linear.in_features, linear.out_features // tp, bias=False))
        attention.o_proj = RowParallelLinear(attention.o_proj.in_features // tp, hidden, config.attention_bias,
                                             parallel)
        if isinstance(layer.mlp, MoE):
            layer.mlp = ParallelMoE(config, parallel)
        else:
            layer.mlp = MLP(hidden, config.intermediate_size // tp)
            layer.mlp.down_proj = RowParallelLinear(config.intermediate_size // tp, hidden, False, parallel)
    # Every parameter is either whole or split along the one dimension whose size changed. The routed experts'
    # gate_up_proj holds gate rows then up rows: its split is recorded for each half, under the checkpoint's
    # per-projection names (`experts.gate_proj`, `experts.up_proj`), which is how loading looks splits up.
    for name, tensor in model.state_dict(keep_vars=True).items():
        halves = 2 if name.endswith(".experts.gate_up_proj") else 1
        for dim, (local, size) in enumerate(zip(tensor.shape, full_shapes[name])):
            if local != size:
                if halves == 2 and dim == 1:
                    local, size = local // 2, size // 2
                start = min(parallel.rank * local, size)  # a last rank past the end (tiny vocab) holds none
                split = Split(dim, start, min(start + local, size), size)
                if halves == 2:
                    prefix = name[:-len("gate_up_proj")]
                    parallel.splits[prefix + "gate_proj"] = parallel.splits[prefix + "up_proj"] = split
                else:
                    parallel.splits[name] = split
    model.parallel = parallel
