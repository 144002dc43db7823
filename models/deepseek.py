"""DeepSeek V2 / V3 / V3.2 in one model, switched by the checkpoint's `config.json` (`model_type` `deepseek_v2`,
`deepseek_v3`, `deepseek_v32`). Weight and config names are those of Hugging Face transformers' DeepSeek files.

Tokens are packed: a forward pass takes `input_ids` `(T,)` of all sequences back to back, with their `positions`
`(T,)`, and attention metadata saying which tokens belong together:
- `PrefillMetadata`: whole prompts, query `t` sees packed rows `[k_start[t], k_end[t])` (its prompt, causally).
  V2/V3 run expanded multi-head attention (SDPA); V3.2 runs the absorbed form through `sparse_prefill`.
- `DecodeMetadata`: `s_q >= 1` new tokens per sequence over the paged latent cache (absorbed form, `dense_decode`,
  or for V3.2 `indexer_logits_paged` + `indexer_topk` + `sparse_decode`).
Either way every layer writes its new latent rows (`kv_a_layernorm(kv_a)` 512 + roped `k_pe` 64) into the cache.

Dtypes: the ops are fed the model's activation dtype. A bfloat16 model runs the bfloat16 kernels; a float32 model runs
the ops' exact float32 reference (with a float32 cache, `PagedKVCache(..., "fp32")`, decode too), which is how the
model is checked against transformers. Decode over a bfloat16 / float32 cache feeds q in the cache's dtype (the ops
need them equal); over the FP8 cache, in the activation dtype. V3.2's indexer over the FP8 index cache is scored in
e4m3 as DeepSeek's release scores it (`Indexer`), over a bfloat16 / float32 one as written (as transformers does).

MLA, per head h (W_UK, W_UV: the key and value halves of `kv_b_proj`):
    q_nope . (W_UK c) + q_pe . k_pe  =  (W_UK^T q_nope) . c + q_pe . k_pe       ("absorbed": 576-d, one KV head)
    out_h = W_UV (sum_s p_s c_s)
"""
import math
from dataclasses import MISSING, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from flashmla_ops.kv_cache import PAGE_BLOCK_SIZE, quantize_fp8_rows
from flashmla_ops.moe import FEW_TOKENS

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
GROUP_LIMITED = ("group_limited_greedy", "noaux_tc")  # routers that choose inside the topk_group best of n_group
# V3.2 prefill scores a prompt's queries against its keys in chunks of at most this many logits (float32: 256 MiB)
PREFILL_INDEX_LOGITS = 1 << 26


# What transformers' DeepseekV2Config / DeepseekV3Config / DeepseekV32Config set for the fields DeepseekConfig reads
# that change the model's output when a config.json leaves them out (DeepseekConfig's own defaults are V2's);
# tests/models/test_loading.py compares them with the installed transformers' classes.
_V3_DEFAULTS = dict(q_lora_rank=1536, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
                    num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
                    first_k_dense_replace=3, bos_token_id=0, eos_token_id=1)
TRANSFORMERS_DEFAULTS = {
    "deepseek_v2": dict(q_lora_rank=1536, moe_intermediate_size=1407, n_routed_experts=64, n_shared_experts=2,
                        num_experts_per_tok=None, n_group=None, topk_group=None, norm_topk_prob=False,
                        routed_scaling_factor=1.0, first_k_dense_replace=0, bos_token_id=1, eos_token_id=2,
                        max_position_embeddings=2048),
    "deepseek_v3": dict(_V3_DEFAULTS, max_position_embeddings=4096, num_nextn_predict_layers=1),
    "deepseek_v32": dict(_V3_DEFAULTS, max_position_embeddings=163840, index_n_heads=64, index_head_dim=128,
                         index_topk=2048),
}


@dataclass
class DeepseekConfig:
    """The `config.json` fields the model reads (names as in transformers' DeepseekV2/V3/V32Config)."""
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    moe_intermediate_size: int = 0
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = None
    scoring_func: str | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1  # past first_k_dense_replace, every moe_layer_freq-th layer is MoE (DeepSeek's code)
    mlp_layer_types: list[str] | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the others (not run here)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")
        for field in fields(self):  # a size given as a string ("4096") or a float would fail far from here
            value = getattr(self, field.name)
            if field.type in (int, int | None) and value is not None and (
                    not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{field.name} must be an int, got {value!r}")
        if self.moe_layer_freq < 1:
            raise ValueError(f"moe_layer_freq must be at least 1, got {self.moe_layer_freq}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (all DeepSeek checkpoints), got {self.hidden_act!r}")
        if self.is_sparse and self.q_lora_rank is None:
            raise ValueError("deepseek_v32 needs q_lora_rank: the indexer reads the compressed query")
        if self.scoring_func is None:  # V2 routes with softmax, V3 / V3.2 with sigmoid + bias ("noaux_tc")
            self.scoring_func = "softmax" if self.model_type == "deepseek_v2" else "sigmoid"
        if self.topk_method is None:
            self.topk_method = "greedy" if self.model_type == "deepseek_v2" else "noaux_tc"
        if self.n_routed_experts and self.topk_method in GROUP_LIMITED and (self.n_group or 1) > 1 and (
                self.n_routed_experts % self.n_group or self.topk_group is None
                or not 1 <= self.topk_group <= self.n_group):
            # else the router fails at its first forward or, with topk_group 0, sends every token to the same experts
            raise ValueError(f"group-limited routing ({self.topk_method}) needs n_routed_experts "
                             f"({self.n_routed_experts}) split into n_group ({self.n_group}) equal groups and "
                             f"topk_group in [1, n_group], got {self.topk_group}")
        if self.model_type in ("deepseek_v2", "deepseek_v32"):
            # V2 ropes adjacent pairs (complex multiply); V3.2's attention does too whatever the config says (as in
            # transformers' port; its indexer ropes halves, in IndexerAttention)
            self.rope_interleave = True

    @classmethod
    def from_dict(cls, config: dict) -> "DeepseekConfig":
        """From a `config.json` dict; RoPE given either as transformers 5's `rope_parameters` (with `rope_theta`
        inside) or as the checkpoints' `rope_theta` + `rope_scaling`. A field the dict leaves out takes the value
        transformers' config class of its model_type gives it (TRANSFORMERS_DEFAULTS), so that a hand-written config
        routes and stops as transformers reads it."""
        if config.get("model_type") not in MODEL_TYPES:  # before the fields, whose defaults depend on it
            raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {config.get('model_type')!r}")
        config = {**TRANSFORMERS_DEFAULTS.get(config.get("model_type"), {}), **config}
        missing = [f.name for f in fields(cls) if f.name not in config and f.default is MISSING
                   and f.default_factory is MISSING and f.name not in ("rope_theta", "rope_scaling")]
        if missing:
            raise ValueError(f"the config of a {config['model_type']} model needs {', '.join(missing)}")
        rope = dict(config.pop("rope_parameters", None) or config.get("rope_scaling") or {})
        config["rope_theta"] = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise ValueError(f"rope type must be 'default' or 'yarn', got {rope_type!r}")
        config["rope_scaling"] = rope if rope_type == "yarn" else None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_sparse(self) -> bool:
        """DeepSeek Sparse Attention (V3.2): a lightning indexer picks `index_topk` keys per query."""
        return self.model_type == "deepseek_v32"

    def is_moe_layer(self, layer_idx: int) -> bool:
        if self.mlp_layer_types is not None:
            return self.mlp_layer_types[layer_idx] == "sparse"
        # as DeepSeek's V2 / V3 code reads the config (transformers' port ignores moe_layer_freq; every DeepSeek
        # checkpoint sets it to 1)
        return (bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


# ---------------------------------------------------------------- RoPE (default and YaRN)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(config: DeepseekConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies `(qk_rope_head_dim // 2,)` float32 and the factor cos/sin are multiplied by.

    YaRN (DeepSeek's): interpolate low frequencies by `factor`, keep high ones, with a linear ramp between the
    dimensions that turn `beta_fast` and `beta_slow` times over `original_max_position_embeddings`; cos/sin are scaled
    by `attention_factor` if given, else `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` when both are set
    (every DeepSeek checkpoint), else `mscale(factor)` (transformers' rule; DeepSeek's remote code takes a missing
    `mscale` as 1 and a missing `mscale_all_dim` as 0 in the ratio instead).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rope = config.rope_scaling
    if rope is None:
        return inv_freq, 1.0
    factor = rope["factor"]
    original_max = rope.get("original_max_position_embeddings", config.max_position_embeddings)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(rope.get("beta_slow") or 1)), dim - 1)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3), 0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor") or (
        yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim) if mscale and mscale_all_dim
        else yarn_get_mscale(factor))
    return inv_freq, attention_factor


def softmax_scale(config: DeepseekConfig) -> float:
    """`qk_head_dim ** -0.5`, times `mscale(factor, mscale_all_dim) ** 2` under YaRN."""
    scale = config.qk_head_dim ** -0.5
    rope = config.rope_scaling
    if rope is not None and rope.get("mscale_all_dim"):
        scale *= yarn_get_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        # float32 whatever the model's dtype: bf16 frequencies drift by up to 0.4%, radians off at long positions
        self.register_buffer("inv_freq", torch.empty(config.qk_rope_head_dim // 2, dtype=torch.float32),
                             persistent=False)
        self.attention_factor = 1.0

    def reset_parameters(self) -> None:
        """Fill `inv_freq` (a computed buffer: called once the model is off the meta device)."""
        inv_freq, self.attention_factor = rope_inv_freq(self.config)
        self.inv_freq.copy_(inv_freq)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions `(...)` -> cos, sin `(..., qk_rope_head_dim)` float32 (each frequency twice, halves layout)."""
        freqs = positions[..., None].float() * self.inv_freq
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x `(T, ..., d)`, cos/sin `(T, d)`. Interleaved: pairs `(x0, x1), (x2, x3), ...` share a frequency; they are
    regrouped into halves first (q and k alike, so dot products are unchanged). Computed in float32."""
    dtype = x.dtype
    x = x.float()
    if interleaved:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    cos = cos.view(cos.shape[0], *[1] * (x.dim() - 2), cos.shape[-1])
    sin = sin.view(sin.shape[0], *[1] * (x.dim() - 2), sin.shape[-1])
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(dtype)


# ---------------------------------------------------------------- attention metadata


@dataclass
class PrefillMetadata:
    """Whole prompts packed into `T` tokens.

    slot_mapping `(T,)` int64: each token's flat cache slot. k_start, k_end `(T,)` int32: token `t` attends to packed
    rows `[k_start[t], k_end[t])` (its prompt's first row, its own row + 1). prompt_lengths: the prompts' lengths in
    packing order (host ints).
    """
    slot_mapping: torch.Tensor
    k_start: torch.Tensor
    k_end: torch.Tensor
    prompt_lengths: tuple[int, ...]


@dataclass
class DecodeMetadata:
    """`s_q` new tokens for each of `batch` sequences, packed as `T = batch * s_q` rows (`decode_metadata` builds it).

    block_table `(batch, max_blocks_per_seq)` int32; cache_seqlens `(batch,)` int32, including the new tokens;
    positions `(T,)` and slot_mapping `(T,)` int64. tile_scheduler_metadata and num_splits: `get_mla_metadata`'s split
    for the dense decode (computed once a step, read by every layer), or None: the split by shape alone.
    """
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    s_q: int
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    tile_scheduler_metadata: torch.Tensor | None = None
    num_splits: torch.Tensor | None = None


def decode_metadata(block_table: torch.Tensor, cache_seqlens: torch.Tensor, s_q: int,
                    num_sm_parts: int | None = None) -> DecodeMetadata:
    """Everything a decode step derives from the cache's block table and lengths, on the device, without a sync; with
    `num_sm_parts`, the dense decode's balanced split over that many SM groups too (`get_mla_metadata`)."""
    batch = cache_seqlens.shape[0]
    positions = cache_seqlens.long()[:, None] - s_q + torch.arange(s_q, device=cache_seqlens.device)
    blocks = torch.gather(block_table.long(), 1, positions // PAGE_BLOCK_SIZE)
    slot_mapping = (blocks * PAGE_BLOCK_SIZE + positions % PAGE_BLOCK_SIZE).reshape(batch * s_q)
    schedule = (None, None)
    if num_sm_parts is not None:
        schedule = torch.ops.flashmla.get_mla_metadata(cache_seqlens, num_sm_parts)
    return DecodeMetadata(block_table, cache_seqlens, s_q, positions.reshape(batch * s_q), slot_mapping, *schedule)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Top-k expert choice, float32 (transformers keeps `gate.weight` and the bias in float32 too).

    scores = softmax(logits) (V2) or sigmoid(logits) (V3); experts are chosen on scores + e_score_correction_bias
    (V3's "noaux_tc"), only inside the `topk_group` best of `n_group` groups (group score: the best expert (V2) or the
    sum of the best two (V3)); the weights are the unbiased scores, optionally normalised to sum 1
    (`norm_topk_prob`), times `routed_scaling_factor` (V2 with `norm_topk_prob` and more than one expert a token:
    normalised, not scaled, as DeepSeek's V2 code does).
    """

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def rank(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x `(T, hidden)` -> scores `(T, E)`, the choice scores `(T, E)` (biased; -inf outside the kept groups) and
        the group scores `(T, n_group)` (None without group-limited routing): what the top-k choices are made on."""
        config = self.config
        logits = F.linear(x.float(), self.weight)
        scores = logits.softmax(-1) if config.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        group_scores = None
        if config.topk_method in GROUP_LIMITED and (config.n_group or 1) > 1:
            grouped = choice.view(x.shape[0], config.n_group, -1)
            if config.topk_method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            group_idx = group_scores.topk(config.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).view_as(choice)
        return scores, choice, group_scores

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x `(T, hidden)` -> weights `(T, top_k)` float32, expert indices `(T, top_k)` int64."""
        config = self.config
        scores, choice, _ = self.rank(x)
        indices = choice.topk(config.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, indices)
        if config.topk_method == "group_limited_greedy":
            # V2 (DeepSeek's code and transformers') zeroes the scores outside the kept groups before its top-k: with
            # more experts a token than the kept groups hold, the extra choices weigh 0, not their unmasked score
            # (V3's noaux_tc gathers the unmasked scores, as here)
            weights = weights.masked_fill(choice.gather(1, indices) == float("-inf"), 0)
        if config.model_type == "deepseek_v2":
            # DeepSeek's V2 code normalises instead of scaling, with more than one expert a token (transformers' V2
            # port ignores norm_topk_prob; every V2 checkpoint ships it false, where all three agree)
            if config.norm_topk_prob and config.num_experts_per_tok > 1:
                return weights / (weights.sum(-1, keepdim=True) + 1e-20), indices
            return weights * config.routed_scaling_factor, indices
        if config.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * config.routed_scaling_factor, indices


# torch's release as (major, minor): "2.9.0a0+git..." is (2, 9)
TORCH_RELEASE = tuple(int(part) for part in torch.__version__.split(".")[:2])


def takes_grouped_mm(device: torch.device, hidden: int, intermediate: int) -> bool:
    """Whether the experts' bfloat16 products on `device` take `torch._grouped_mm`: where it is one kernel with no
    host sync, so inside a CUDA graph too (Hopper from its first release, 2.8; datacenter Blackwell from 2.9), on the
    CPU from 2.9 (2.8 has no CPU kernel), and on other NVIDIA GPUs from 2.9 outside a CUDA graph: there torch loops
    over the groups after copying their offsets to the host, a sync that a capture (a compiled decode step's CUDA
    graph) cannot take, and 2.8 raises. Not before 2.8, nor on AMD GPUs (ROCm's torch names them "cuda" with the gfx
    version as capability). Every kernel wants the rows' strides in multiples of 16 bytes (8 bfloat16). Elsewhere the
    experts take the dense path (every expert on every token: the same weight bytes as a batch that reaches them all,
    more FLOPs)."""
    if not hasattr(torch, "_grouped_mm") or hidden % 8 or intermediate % 8:
        return False
    if device.type == "cpu":
        return TORCH_RELEASE >= (2, 9)
    if device.type != "cuda" or torch.version.hip is not None:
        return False
    major = torch.cuda.get_device_properties(device).major
    if major == 9 or (major == 10 and TORCH_RELEASE >= (2, 9)):
        return True
    # is_compiling first: dynamo does not trace the capture query (interface.FlashMLASchedMeta.fill)
    return (TORCH_RELEASE >= (2, 9) and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


class Experts(nn.Module):
    """The routed experts' SwiGLU weights stacked: `gate_up_proj` `(E, 2 * moe_intermediate, hidden)` (each expert's
    gate rows then its up rows, as in transformers: one grouped GEMM multiplies by both) and `down_proj` `(E, hidden,
    moe_intermediate)`; the checkpoint's `experts.{e}.{gate,up,down}_proj.weight` are stacked into them on load.
    `gate_proj` / `up_proj` are views of the two halves."""

    def __init__(self, config: DeepseekConfig, num_experts: int | None = None, inter: int | None = None):
        super().__init__()
        num_experts = config.n_routed_experts if num_experts is None else num_experts
        inter = config.moe_intermediate_size if inter is None else inter
        hidden = config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.first_expert = 0  # under expert parallelism (models/parallel.py): this rank's first expert

    @property
    def gate_proj(self) -> torch.Tensor:
        return self.gate_up_proj[:, :self.down_proj.shape[2]]

    @property
    def up_proj(self) -> torch.Tensor:
        return self.gate_up_proj[:, self.down_proj.shape[2]:]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """x `(T, hidden)`, weights / indices `(T, top_k)` -> `(T, hidden)`: in bfloat16 the `routed_experts` op for
        up to `FEW_TOKENS` tokens (GEMVs over the chosen experts) and `grouped` past them (the dtype of grouped GEMM
        kernels), else `dense`. None has a data-dependent shape or a host sync, so all run inside the decode step's
        CUDA graph. Holding only some experts (expert parallelism), choices of the others count
        with weight 0: their ranks add them."""
        num_experts = self.gate_up_proj.shape[0]
        local = indices - self.first_expert
        held = (local >= 0) & (local < num_experts)
        weights = weights.masked_fill(~held, 0)
        if x.dtype == torch.bfloat16:
            local = local.masked_fill(~held, num_experts)
            if x.shape[0] <= FEW_TOKENS:
                return torch.ops.flashmla.routed_experts(x, self.gate_up_proj, self.down_proj, weights, local)
            if takes_grouped_mm(x.device, x.shape[-1], self.down_proj.shape[2]):
                return self.grouped(x, weights, local)
        combine = torch.zeros(x.shape[0], num_experts + 1, dtype=weights.dtype, device=x.device)
        return self.dense(x, combine.scatter_add_(1, local.masked_fill(~held, num_experts), weights)[:, :-1])

    def grouped(self, x: torch.Tensor, weights: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """The `T * top_k` (token, expert) pairs sorted by expert, each projection one grouped matmul
        (`torch._grouped_mm`): every chosen expert's weights are read once for all the rows routed to it, nothing is
        copied, and the group offsets stay on the device. `local` `(T, top_k)`: expert indices on this rank, E for
        another rank's expert (sorted past the last group)."""
        num_experts = self.gate_up_proj.shape[0]
        flat = local.flatten()
        order = flat.argsort(stable=True)
        pairs_per_expert = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        offsets = pairs_per_expert[:num_experts].cumsum(0, dtype=torch.int32)
        rows = x[order // local.shape[1]]
        gate, up = torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        down = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)
        # Rows past the last group are not written by grouped_mm: select, not multiply, so they cannot leak NaN.
        down = torch.where((flat[order] < num_experts)[:, None], down, 0)
        # Back to (token, k) order, then a fixed-order sum over k in float32: deterministic, unlike index_add_.
        per_choice = torch.empty_like(down).index_copy_(0, order, down).view(*local.shape, -1)
        return torch.einsum("tkh,tk->th", per_choice.float(), weights.float()).to(x.dtype)

    def dense(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """Every expert on every token, mixed by `combine` `(T, E)` (zero for experts not chosen): any dtype,
        differentiable (the training forward), exact; E / top_k times the work of the chosen experts alone."""
        # Batched matmuls against the weights' transposed views read them in place; the einsum equivalents copied
        # every expert's weights into a permuted layout per call (V2-Lite, CPU float32: 4.3 s against 0.18 s).
        gate, up = torch.matmul(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        expert_out = torch.matmul(F.silu(gate) * up, self.down_proj.transpose(1, 2))
        return torch.einsum("eth,te->th", expert_out, combine.to(expert_out.dtype))


class MoE(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, *self.gate(x))
        return out if self.shared_experts is None else out + self.shared_experts(x)


class Indexer(nn.Module):
    """DSA lightning indexer (V3.2): which `index_topk` earlier tokens each query attends to.

        logits[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s]),   w = weights_proj(x) * n_heads^-0.5 * head_dim^-0.5

    q = wq_b(q_resid), k = LayerNorm(wk(x)); the first `qk_rope_head_dim` dims of both are roped, non-interleaved
    (unlike MLA's). With a bf16 / fp32 index cache the logits are computed as written (as transformers does). With
    the FP8 index cache they are scored as DeepSeek's release does: q and k rotated by the normalized Hadamard matrix
    (`rotate`: orthogonal, so exact logits are unchanged; it spreads a row's outliers before quantizing), then q per
    (token, head) and k per token quantized to e4m3 with a power-of-two scale (the cache's rule), in prefill and decode.
    """

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False, dtype=torch.float32)
        # The Sylvester-Hadamard matrix (entries +-1, exact in any dtype; `reset_parameters` fills it), when head_dim
        # is a power of two; else the FP8 scoring quantizes unrotated rows.
        rotates = self.head_dim & (self.head_dim - 1) == 0
        self.register_buffer("hadamard", torch.empty(self.head_dim, self.head_dim, dtype=torch.float32)
                             if rotates else None, persistent=False)

    def reset_parameters(self) -> None:
        """Fill `hadamard` (a computed buffer: called once the model is off the meta device)."""
        if self.hadamard is not None:
            signs = torch.ones(1, 1)
            while signs.shape[0] < self.head_dim:
                signs = torch.cat([torch.cat([signs, signs], 1), torch.cat([signs, -signs], 1)], 0)
            self.hadamard.copy_(signs)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x `(..., head_dim)` -> x H / sqrt(head_dim), computed in float32 and returned in x's dtype (DeepSeek's
        release rotates bf16 rows to bf16 before quantizing them); x itself without `hadamard`."""
        if self.hadamard is None:
            return x
        return ((x.float() @ self.hadamard.float()) * self.head_dim ** -0.5).to(x.dtype)

    def forward(self, x: torch.Tensor, q_resid: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x `(T, hidden)`, q_resid `(T, q_lora_rank)` -> q `(T, n_heads, head_dim)`, k `(T, head_dim)` (both in the
        activation dtype), weights `(T, n_heads)` float32."""
        q = self.wq_b(q_resid).view(x.shape[0], self.n_heads, self.head_dim)
        k = self.k_norm(self.wk(x))
        q = torch.cat([apply_rope(q[..., :self.rope_dim], cos, sin, False), q[..., self.rope_dim:]], dim=-1)
        k = torch.cat([apply_rope(k[..., :self.rope_dim], cos, sin, False), k[..., self.rope_dim:]], dim=-1)
        weights = self.weights_proj(x.float()) * (self.n_heads ** -0.5 * self.head_dim ** -0.5)
        return q, k, weights


class MLAttention(nn.Module):
    """Multi-head Latent Attention over the paged latent cache (see the module docstring for the two forms)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        hidden, heads = config.hidden_size, config.num_attention_heads
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * config.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)
            self.q_b_proj = nn.Linear(config.q_lora_rank, heads * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, config.kv_lora_rank + config.qk_rope_head_dim,
                                            bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim),
                                   bias=False)
        self.o_proj = nn.Linear(heads * config.v_head_dim, hidden, bias=config.attention_bias)
        self.indexer = Indexer(config) if config.is_sparse else None
        self.softmax_scale = softmax_scale(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                metadata: PrefillMetadata | DecodeMetadata, kv_cache: torch.Tensor,
                index_cache: torch.Tensor | None) -> torch.Tensor:
        """x `(T, hidden)`, cos/sin `(T, qk_rope_head_dim)`; kv_cache `(num_blocks, 64, 1, 576)` bf16 / fp32 or
        `(num_blocks, 64, 1, 656)` uint8 (written here); index_cache (V3.2, written here). Returns `(T, hidden)`."""
        config = self.config
        num_tokens = x.shape[0]
        if config.q_lora_rank is None:
            q_resid, q = None, self.q_proj(x)
        else:
            q_resid = self.q_a_layernorm(self.q_a_proj(x))
            q = self.q_b_proj(q_resid)
        q_nope, q_pe = q.view(num_tokens, self.num_heads, config.qk_head_dim).split(
            [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe = apply_rope(q_pe, cos, sin, config.rope_interleave)
        k_pe = apply_rope(k_pe, cos, sin, config.rope_interleave)
        is_fp8 = kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn)
        cache_dtype = x.dtype if is_fp8 else kv_cache.dtype  # what the cache is written from and decode reads in
        torch.ops.flashmla.write_kv_cache(kv_cache, latent.to(cache_dtype), k_pe.to(cache_dtype),
                                          metadata.slot_mapping, is_fp8)

        if isinstance(metadata, PrefillMetadata) and self.indexer is None:
            return self.o_proj(self._expanded_prefill(q_nope, q_pe, latent, k_pe, metadata))

        w_kv = self.kv_b_proj.weight.view(self.num_heads, config.qk_nope_head_dim + config.v_head_dim,
                                          config.kv_lora_rank)
        w_uk, w_uv = w_kv.split([config.qk_nope_head_dim, config.v_head_dim], dim=1)
        q_latent = torch.einsum("thd,hdc->thc", q_nope, w_uk)
        q_absorbed = torch.cat([q_latent, q_pe], dim=-1)  # (T, heads, 576), activation dtype
        index_q = index_weights = None
        index_fp8 = False
        if self.indexer is not None:
            index_q, index_k, index_weights = self.indexer(x, q_resid, cos, sin)
            index_fp8 = index_cache.dtype in (torch.uint8, torch.float8_e4m3fn)
            if index_fp8:  # DeepSeek's FP8 scoring (see Indexer): rotated rows, quantized where they are scored
                index_q, index_k = self.indexer.rotate(index_q), self.indexer.rotate(index_k)
            torch.ops.flashmla.write_index_cache(index_cache, index_k if index_fp8 else index_k.to(index_cache.dtype),
                                                 metadata.slot_mapping)
        if isinstance(metadata, PrefillMetadata):
            indices = self.prefill_indices(index_q, index_k, index_weights, metadata, index_fp8)
            kv = torch.cat([latent, k_pe], dim=-1)[:, None]
            out_latent = torch.ops.flashmla.sparse_prefill(q_absorbed, kv, indices[:, None], self.softmax_scale,
                                                           config.kv_lora_rank, None, None, 0)[0]
        else:
            out_latent = self._decode(q_absorbed.to(cache_dtype), metadata, kv_cache, index_cache, index_q,
                                      index_weights, is_fp8, index_fp8)
        out = torch.einsum("thc,hvc->thv", out_latent.to(x.dtype), w_uv)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * config.v_head_dim))

    def prefill_indices(self, index_q, index_k, index_weights, metadata: PrefillMetadata,
                        fp8: bool = False) -> torch.Tensor:
        """V3.2 prefill: the packed rows `(T, index_topk)` int32 each query attends to (-1 padded where it sees fewer
        tokens), from the indexer's q `(T, index_n_heads, index_head_dim)`, k `(T, index_head_dim)`, weights; with
        `fp8` q and k (rotated) are scored in e4m3, the keys exactly as the FP8 index cache holds them."""
        q_scale = k_scale = None
        if fp8:
            (index_q, q_scale), (index_k, k_scale) = quantize_fp8_rows(index_q), quantize_fp8_rows(index_k)
        # Per prompt, in query chunks of at most PREFILL_INDEX_LOGITS logits, each against the keys it can see (its
        # prompt's, up to the chunk's last query): the packed prompts' whole (T, T) logits were T**2 floats (16 GiB
        # for 16 prompts of 4096 tokens, 64 GiB for one of 128k), almost all of them masked.
        parts = []
        start = 0
        for length in metadata.prompt_lengths:
            rows = max(1, PREFILL_INDEX_LOGITS // length)
            for first in range(start, start + length, rows):
                last = min(first + rows, start + length)  # queries [first, last) see keys [start, last)
                logits = torch.ops.flashmla.indexer_logits(
                    index_q[first:last], index_k[start:last], index_weights[first:last],
                    metadata.k_start[first:last] - start, metadata.k_end[first:last] - start,
                    None if q_scale is None else q_scale[first:last], None if k_scale is None else k_scale[start:last])
                selected = torch.ops.flashmla.indexer_topk(logits, self.config.index_topk, None)
                parts.append(torch.where(selected >= 0, selected + start, selected))
            start += length
        if not parts:
            return index_q.new_empty(0, self.config.index_topk, dtype=torch.int32)
        return torch.cat(parts)

    def _expanded_prefill(self, q_nope, q_pe, latent, k_pe, metadata: PrefillMetadata) -> torch.Tensor:
        """Dense prefill as ordinary multi-head attention: keys/values expanded from the latent by kv_b_proj.
        Returns `(T, heads * v_head_dim)`."""
        config = self.config
        num_tokens = latent.shape[0]
        kv = self.kv_b_proj(latent).view(num_tokens, self.num_heads, config.qk_nope_head_dim + config.v_head_dim)
        k_nope, value = kv.split([config.qk_nope_head_dim, config.v_head_dim], dim=-1)
        key = torch.cat([k_nope, k_pe[:, None].expand(-1, self.num_heads, -1)], dim=-1)
        query = torch.cat([q_nope, q_pe], dim=-1)
        # One causal attention per prompt length: the prompts of one length batched into 4-d (prompts, heads,
        # length, d) tensors, the shape SDPA's fused kernels take (3-d inputs fall back to the math kernel, which
        # materializes length x length scores per head); memory stays linear in each prompt (a packed mask would be
        # T x T and keep SDPA off its fused kernels).
        lengths = metadata.prompt_lengths
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        out = value.new_empty(num_tokens, self.num_heads, config.v_head_dim)
        for length in sorted(set(lengths)):
            every = lengths.count(length) == len(lengths)  # one length: no gather, no scatter
            rows = None if every else torch.cat([torch.arange(start, start + length, device=value.device)
                                                 for start, n in zip(starts, lengths) if n == length])
            batched = [(t if every else t[rows]).view(-1, length, self.num_heads, t.shape[-1]).transpose(1, 2)
                       for t in (query, key, value)]
            attended = F.scaled_dot_product_attention(*batched, is_causal=True, scale=self.softmax_scale)
            attended = attended.transpose(1, 2).reshape(-1, self.num_heads, config.v_head_dim)
            if every:
                return attended.reshape(num_tokens, self.num_heads * config.v_head_dim)
            out[rows] = attended
        return out.reshape(num_tokens, self.num_heads * config.v_head_dim)

    def _decode(self, q_absorbed, metadata: DecodeMetadata, kv_cache, index_cache, index_q, index_weights,
                is_fp8, index_fp8) -> torch.Tensor:
        """q_absorbed `(T, heads, 576)` -> latent output `(T, heads, kv_lora_rank)` (q's dtype) over the paged cache;
        sparse (index_q `(T, index_n_heads, index_head_dim)` given; with `index_fp8` rotated, scored in e4m3) or
        dense."""
        batch, s_q = metadata.cache_seqlens.shape[0], metadata.s_q
        q = q_absorbed.view(batch, s_q, self.num_heads, -1)
        if index_q is None:
            out = torch.ops.flashmla.dense_decode(
                q, kv_cache, metadata.block_table, metadata.cache_seqlens, metadata.tile_scheduler_metadata,
                metadata.num_splits, self.config.kv_lora_rank, self.softmax_scale, s_q > 1, is_fp8, None)[0]
        else:
            q_scale = None
            if index_fp8:
                index_q, q_scale = quantize_fp8_rows(index_q)
                q_scale = q_scale.view(batch, s_q, -1)
            logits = torch.ops.flashmla.indexer_logits_paged(
                index_q.view(batch, s_q, *index_q.shape[1:]), index_cache, index_weights.view(batch, s_q, -1),
                metadata.block_table, metadata.cache_seqlens, q_scale)
            indices = torch.ops.flashmla.indexer_topk(logits, self.config.index_topk, metadata.block_table)
            out = torch.ops.flashmla.sparse_decode(
                q, kv_cache, indices, None, None, None, None, None, None, self.config.kv_lora_rank,
                self.softmax_scale, is_fp8, None)[0]
        return out.view(batch * s_q, self.num_heads, -1)


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLAttention(config)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, metadata, kv_cache, index_cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, metadata, kv_cache, index_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekModel(nn.Module):
    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepseekForCausalLM(nn.Module):
    """The whole model; parameter names match the checkpoints' (`model.layers.{i}.self_attn.kv_b_proj.weight`, ...)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.model = DeepseekModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.parallel = None  # this rank's models.parallel.Parallel once models.parallel.shard_model has split it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: PrefillMetadata | DecodeMetadata,
                cache, logits_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions `(T,)`; cache: a `models.cache.PagedKVCache` (its per-layer tensors are written).
        Returns logits `(T, vocab)` float32, or only the rows `logits_rows` (e.g. each prompt's last token)."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions)
        for layer_idx, layer in enumerate(self.model.layers):
            index_cache = cache.index_cache[layer_idx] if cache.index_cache is not None else None
            x = layer(x, cos, sin, metadata, cache.kv_cache[layer_idx], index_cache)
        if logits_rows is not None:
            x = x[logits_rows]
        return self.lm_head(self.model.norm(x)).float()


# ---------------------------------------------------------------- training forward (autograd)
#
# The flashmla ops have no autograd, so training runs the same modules (same parameters) through plain torch, over
# `(batch, seq_len)` windows that each start at position 0:
# - attention: dense causal multi-head attention over keys/values expanded by kv_b_proj (the same equations as the
#   absorbed decode: see the module docstring);
# - MoE: every routed expert computed for every token and combined with the router's weights (zero for experts not
#   chosen), so shapes are static; exact, and cheap while experts are few and small;
# - V3.2's lightning indexer, trained as in DeepSeek V3.2's dense warm-up: per query t, KL(p_t || softmax(I_t)) where
#   I_t are the indexer's logits over the visible keys and p_t is the main attention's distribution summed over heads
#   and renormalised, detached. The indexer reads detached inputs, so only this loss trains it and it does not move
#   the rest of the model.


@dataclass
class TrainingOutput:
    """logits `(batch, seq_len, vocab)` float32; indexer_kl: mean over layers and queries (0 without an indexer);
    expert_load: per MoE layer, tokens routed to each expert `(n_routed_experts,)` (for the routers' bias update)."""
    logits: torch.Tensor
    indexer_kl: torch.Tensor
    expert_load: list[torch.Tensor]


def _training_attention(attention: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x `(batch * seq_len, hidden)` -> attention output `(batch * seq_len, hidden)`, indexer KL (scalar)."""
    config = attention.config
    num_tokens, heads = x.shape[0], attention.num_heads
    if config.q_lora_rank is None:
        q_resid, q = None, attention.q_proj(x)
    else:
        q_resid = attention.q_a_layernorm(attention.q_a_proj(x))
        q = attention.q_b_proj(q_resid)
    q_nope, q_pe = q.view(num_tokens, heads, config.qk_head_dim).split(
        [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
    latent, k_pe = attention.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
    latent = attention.kv_a_layernorm(latent)
    q_pe = apply_rope(q_pe, cos, sin, config.rope_interleave)
    k_pe = apply_rope(k_pe, cos, sin, config.rope_interleave)
    k_nope, value = attention.kv_b_proj(latent).view(num_tokens, heads, -1).split(
        [config.qk_nope_head_dim, config.v_head_dim], dim=-1)

    def by_head(t: torch.Tensor) -> torch.Tensor:  # (batch * seq_len, heads, d) -> (batch, heads, seq_len, d)
        return t.reshape(batch, num_tokens // batch, heads, -1).transpose(1, 2)

    query = by_head(torch.cat([q_nope, q_pe], dim=-1))
    key = by_head(torch.cat([k_nope, k_pe[:, None].expand(-1, heads, -1)], dim=-1))
    out = F.scaled_dot_product_attention(query, key, by_head(value), is_causal=True, scale=attention.softmax_scale)
    out = attention.o_proj(out.transpose(1, 2).reshape(num_tokens, heads * config.v_head_dim))
    if attention.indexer is None:
        return out, out.new_zeros((), dtype=torch.float32)

    seq_len = num_tokens // batch
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device).tril()
    with torch.no_grad():
        scores = (query.float() @ key.float().transpose(-1, -2)) * attention.softmax_scale
        target = scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(1)  # (batch, seq_len, seq_len)
        target = target / target.sum(-1, keepdim=True)
    index_q, index_k, index_weights = attention.indexer(x.detach(), q_resid.detach(), cos, sin)
    index_q = index_q.float().view(batch, seq_len, *index_q.shape[1:])
    index_k = index_k.float().view(batch, seq_len, -1)
    index_logits = torch.einsum("bthd,bsd->bths", index_q, index_k).relu()
    index_logits = torch.einsum("bths,bth->bts", index_logits, index_weights.view(batch, seq_len, -1).float())
    log_probs = index_logits.masked_fill(~causal, float("-inf")).log_softmax(-1).masked_fill(~causal, 0)
    kl = (torch.xlogy(target, target) - target * log_probs).sum(-1).mean()
    return out, kl


def _training_moe(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x `(T, hidden)` -> `(T, hidden)`, tokens per routed expert `(n_routed_experts,)`."""
    with torch.autocast(x.device.type, enabled=False):  # the router runs in float32, as at inference
        weights, indices = moe.gate(x.float())
    num_experts = moe.experts.gate_up_proj.shape[0]
    combine = torch.zeros(x.shape[0], num_experts, dtype=weights.dtype, device=x.device).scatter(1, indices, weights)
    out = moe.experts.dense(x, combine)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x)
    return out, torch.bincount(indices.flatten(), minlength=num_experts)


def training_forward(model: DeepseekForCausalLM, input_ids: torch.Tensor) -> TrainingOutput:
    """input_ids `(batch, seq_len)`, each row a window starting at position 0: differentiable logits, the indexer's
    KL to the main attention (V3.2) and the experts' load, through the model's own modules. One process's model only:
    its MoE skips a sharded model's all-reduce and indexes every expert."""
    if model.parallel is not None:
        raise ValueError("training_forward: the model is sharded over ranks (tensor or expert parallel); training runs "
                         "on one process's model")
    batch, seq_len = input_ids.shape
    positions = torch.arange(seq_len, device=input_ids.device).repeat(batch)
    x = model.model.embed_tokens(input_ids.reshape(-1))
    cos, sin = model.model.rotary_emb(positions)
    kl_terms, expert_load = [], []
    for layer in model.model.layers:
        attention_out, kl = _training_attention(layer.self_attn, layer.input_layernorm(x), cos, sin, batch)
        kl_terms.append(kl)
        x = x + attention_out
        h = layer.post_attention_layernorm(x)
        if isinstance(layer.mlp, MoE):
            mlp_out, load = _training_moe(layer.mlp, h)
            expert_load.append(load)
        else:
            mlp_out = layer.mlp(h)
        x = x + mlp_out
    logits = model.lm_head(model.model.norm(x)).float().view(batch, seq_len, -1)
    return TrainingOutput(logits, torch.stack(kl_terms).mean(), expert_load)
