"""Load a Hugging Face DeepSeek checkpoint directory by weight name.

`config.json`, `model.safetensors` or `model.safetensors.index.json` + shards, and tokenizer files (optional). The
model is built on the meta device, allocated once on the target device, and filled tensor by tensor from
memory-mapped shards, so the weights are never held twice. FP8 block-quantized weights (`weight` float8_e4m3fn with
`weight_scale_inv` `(ceil(rows / 128), ceil(cols / 128))`, as DeepSeek V3 ships them) are dequantized on the way,
partial last blocks included. The multi-token-prediction layers (`model.layers.{num_hidden_layers}.*` up to
`num_nextn_predict_layers` of them) are skipped; layers past those (a config with fewer layers than its checkpoint:
a slice of the model) are skipped with a warning.
A tensor-parallel rank (`models.parallel`) reads only its parts of the tensors and only its experts.
"""
import json
import logging
import math
import os
import re
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from .cache import is_int
from .deepseek import DeepseekConfig, DeepseekForCausalLM
from .parallel import Parallel, Split, shard_model

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"
EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model: names the tensor and the file."""


def build_model(config: DeepseekConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                parallel: Parallel | None = None) -> DeepseekForCausalLM:
    """The model with uninitialized weights in `dtype` on `device` (built on meta, allocated once), or with
    `parallel` this rank's part of it. The router and the indexer's `weights_proj` stay float32; RoPE frequencies
    and the indexer's Hadamard matrix are filled."""
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32 (the ops' activation dtypes), got {dtype}")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = DeepseekForCausalLM(config)
            if parallel is not None:
                shard_model(model, parallel)
    finally:
        torch.set_default_dtype(default_dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary_emb.reset_parameters()
    for layer in model.model.layers:
        if layer.self_attn.indexer is not None:
            layer.self_attn.indexer.reset_parameters()
    return model.eval()


def checkpoint_names(model: DeepseekForCausalLM) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Checkpoint tensor name -> (model tensor, expert row or None). Stacked experts take one name per expert."""
    targets, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # tied lm_head / embed_tokens: the checkpoint holds it once
            continue
        seen.add(id(tensor))
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".mlp.experts"):
            experts = model.get_submodule(prefix)
            first = experts.first_expert  # not 0 under expert parallelism
            # gate_up_proj stacks each expert's gate rows then up rows: one checkpoint name per half
            views = {"gate_proj": experts.gate_proj, "up_proj": experts.up_proj} if proj == "gate_up_proj" \
                else {proj: tensor}
            for part, view in views.items():
                for expert in range(tensor.shape[0]):
                    targets[f"{prefix}.{first + expert}.{part}.weight"] = (view, expert)
        else:
            targets[name] = (tensor, None)
    return targets


def scale_grid(weight_shape, scale_shape, block: tuple[int, int]) -> tuple[int, int]:
    """The `weight_scale_inv` shape of a `weight_shape` weight in `block` blocks, or ValueError if `scale_shape` is
    another."""
    rows, cols = weight_shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_shape) != expected:
        raise ValueError(f"scale_inv has shape {tuple(scale_shape)}, expected {expected} for a {rows}x{cols} "
                         f"weight in {block[0]}x{block[1]} blocks")
    return expected


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight `(rows, cols)` float8_e4m3fn, scale_inv `(ceil(rows / block[0]), ceil(cols / block[1]))` float32 ->
    float32 `weight * scale_inv` of its block; the last block row / column may be partial (e.g. 576 rows)."""
    rows, cols = weight.shape
    expected = scale_grid(weight.shape, scale_inv.shape, block)
    # each scale broadcast over its block (the weight padded to whole blocks), where expanding the scales to the
    # weight's size took two more float32 copies of it
    values = F.pad(weight.float(), (0, -cols % block[1], 0, -rows % block[0]))
    blocks = values.view(expected[0], block[0], expected[1], block[1]) * scale_inv.float()[:, None, :, None]
    return blocks.view(values.shape)[:rows, :cols]


def _truncated_tensors(path: Path) -> list[str]:
    """Tensors of a safetensors file whose data run past its end (read from the header)."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    size = path.stat().st_size
    return [name for name, info in header.items()
            if name != "__metadata__" and 8 + header_len + info["data_offsets"][1] > size]


def _open(path: Path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        try:
            truncated = _truncated_tensors(path)
        except (OSError, ValueError):
            truncated = []
        detail = f"tensors {truncated[:4]}{'...' if len(truncated) > 4 else ''} run past its end (truncated); " \
            if truncated else ""
        raise CheckpointError(f"cannot read {path}: {detail}{error}") from error


def _weight_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the file that holds it."""
    index = checkpoint / INDEX_FILE
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} must map tensor names to files in its 'weight_map'")
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{checkpoint} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def load_weights(model: DeepseekForCausalLM, checkpoint: str | os.PathLike,
                 weight_block_size: tuple[int, int] = (128, 128)) -> None:
    """Fill every model tensor from the checkpoint, shard by shard; a tensor-parallel rank's model (`model.parallel`)
    reads only its part of each (`Parallel.splits`). Raises `CheckpointError` on a missing, unexpected or wrongly
    shaped tensor or an unreadable shard, naming the tensor and the file."""
    checkpoint = Path(checkpoint)
    config = model.config
    targets = checkpoint_names(model)
    files = _weight_files(checkpoint)
    num_layers, mtp_end = config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers
    splits = model.parallel.splits if model.parallel is not None else {}
    # tied embeddings stored once under the head's name (safetensors' save_model keeps the first name of a shared
    # tensor, lm_head.weight): that tensor is the embedding, as transformers loads it
    head_is_embed = config.tie_word_embeddings and EMBED not in files and HEAD in files
    by_file: dict[Path, list[str]] = {}
    mtp, beyond = 0, set()
    for name, path in files.items():
        layer = LAYER.match(name)
        if layer and num_layers <= int(layer.group(1)) < mtp_end:
            mtp += 1
        elif layer and int(layer.group(1)) >= mtp_end:
            beyond.add(int(layer.group(1)))
        elif name.endswith(SCALE_SUFFIX):
            if name[:-len(SCALE_SUFFIX)] not in files:
                raise CheckpointError(f"tensor {name} in {path} scales {name[:-len(SCALE_SUFFIX)]}, which the "
                                      f"checkpoint does not hold")
        elif name == HEAD and config.tie_word_embeddings and not head_is_embed:
            logger.info("lm_head.weight in %s not loaded: tie_word_embeddings uses model.embed_tokens.weight", path)
        elif not _other_ranks_expert(name, splits):
            by_file.setdefault(path, []).append(name)
    if mtp:
        logger.info("skipped %d tensors of the multi-token-prediction layer(s) model.layers.%d-%d (not used for "
                    "generation)", mtp, num_layers, mtp_end - 1)
    if beyond:
        logger.warning("%s holds model.layers.%d-%d, which config.json's num_hidden_layers = %d and "
                       "num_nextn_predict_layers = %d leave out: not loaded (the model is a slice of the "
                       "checkpoint's)", checkpoint, min(beyond), max(beyond), num_layers,
                       config.num_nextn_predict_layers)
    filled = set()
    for path in sorted(by_file):
        with _open(path) as f:
            held = set(f.keys())
            for name in by_file[path]:
                model_name = EMBED if name == HEAD and head_is_embed else name
                if model_name not in targets:
                    raise CheckpointError(f"unexpected tensor {name} in {path}: the model has no such weight")
                if name not in held:
                    raise CheckpointError(f"{INDEX_FILE} puts tensor {name} in {path}, which does not hold it")
                tensor, expert = targets[model_name]
                target = tensor[expert] if expert is not None else tensor
                split = _checkpoint_split(model_name, splits)
                want = list(target.shape)
                if split is not None:
                    want[split.dim] = split.size
                shape = f.get_slice(name).get_shape()
                if shape != want:
                    raise CheckpointError(f"tensor {name} in {path} has shape {tuple(shape)}, the model "
                                          f"expects {tuple(want)}")
                _fill(target, _read(f, path, name, files, weight_block_size, split, target.device), split)
                filled.add(model_name)
    missing = sorted(set(targets) - filled)
    if missing:
        where = checkpoint / (INDEX_FILE if (checkpoint / INDEX_FILE).exists() else SINGLE_FILE)
        raise CheckpointError(f"missing tensor {missing[0]} in {where}"
                              + (f" (and {len(missing) - 1} more: {missing[1:4]}...)" if len(missing) > 1 else ""))


def _checkpoint_split(name: str, splits: dict[str, Split]) -> Split | None:
    """The part of checkpoint tensor `name` this rank holds (None: all of it). A routed expert's weight is one row of
    a stacked parameter: its split less the expert dimension (split by expert, the experts are picked by name)."""
    expert = EXPERT_WEIGHT.match(name)
    if expert is None:
        return splits.get(name)
    split = splits.get(f"{expert['prefix']}.{expert['proj']}")
    return None if split is None or split.dim == 0 else replace(split, dim=split.dim - 1)


def _other_ranks_expert(name: str, splits: dict[str, Split]) -> bool:
    """A routed expert's weight that expert parallelism puts on another rank."""
    expert = EXPERT_WEIGHT.match(name)
    split = expert and splits.get(f"{expert['prefix']}.{expert['proj']}")
    return bool(split) and split.dim == 0 and int(expert["expert"]) < split.size and not (
        split.start <= int(expert["expert"]) < split.stop)


def _fill(target: torch.Tensor, value: torch.Tensor, split: Split | None) -> None:
    """Copy `value`, all of a tensor or the rank's part `split` of it, into `target`; zero the padding past it."""
    with torch.no_grad():
        if split is None:
            target.copy_(value)
        else:
            length = split.stop - split.start
            target.narrow(split.dim, 0, length).copy_(value)
            target.narrow(split.dim, length, target.shape[split.dim] - length).zero_()


def _read(f, path: Path, name: str, files: dict[str, Path], block: tuple[int, int],
          split: Split | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """One checkpoint tensor, or its rows (`split.dim` 0) / columns (1) `[split.start, split.stop)`; FP8 weights
    dequantized with their `weight_scale_inv` (from whichever shard) on `device`, the model's: a quarter of the
    float32 bytes cross to a GPU, and the GPU multiplies (on the CPU, a full V3's 44,544 expert weights took about
    0.2-0.3 s each on two cores).

    A part of an FP8 weight is read from the block boundary at or before its start to the one at or after its stop,
    with those blocks' scales, dequantized, then cut. Equal splits of DeepSeek's weights fall on the 128-blocks, so
    this reads just the part; where they do not (tiny models), at most a block more on each side."""
    is_fp8 = f.get_slice(name).get_dtype() == "F8_E4M3"
    step = block[split.dim if split is not None else 0] if is_fp8 else 1  # rows (or columns) per scale entry
    if split is not None:
        start, stop = split.start // step * step, min(-(-split.stop // step) * step, split.size)

    def part(handle, tensor_name: str, rows_per_entry: int) -> torch.Tensor:
        """All of the tensor, or the entries covering rows [start, stop) (a scale covers `block` rows)."""
        if split is None:
            return handle.get_tensor(tensor_name)
        rows = slice(start // rows_per_entry, -(-stop // rows_per_entry))
        return handle.get_slice(tensor_name)[(slice(None),) * split.dim + (rows,)]

    value = part(f, name, 1)
    scale_name = name + SCALE_SUFFIX
    if not is_fp8:
        if scale_name in files:
            raise CheckpointError(f"tensor {name} in {path} is {f.get_slice(name).get_dtype()} but has a "
                                  f"{scale_name} (in {files[scale_name]}): block scales belong to float8_e4m3fn "
                                  f"weights (a checkpoint cast from FP8 without applying them?)")
        return value
    if scale_name not in files:
        raise CheckpointError(f"tensor {name} in {path} is float8_e4m3fn but {scale_name} is missing")
    scale_path = files[scale_name]
    with nullcontext(f) if scale_path == path else _open(scale_path) as scale_file:
        if scale_name not in scale_file.keys():
            raise CheckpointError(f"{INDEX_FILE} puts tensor {scale_name} in {scale_path}, which does not hold it")
        try:  # the whole scale, before a rank reads its entries: a slice of a wrongly shaped one can look right
            scale_grid(f.get_slice(name).get_shape(), scale_file.get_slice(scale_name).get_shape(), block)
        except ValueError as error:
            raise CheckpointError(f"tensor {scale_name} in {scale_path}: {error}") from error
        scale_inv = part(scale_file, scale_name, step)
    value = dequantize_fp8_blocks(value.to(device), scale_inv.to(device), block)  # shapes checked whole above
    return value if split is None else value.narrow(split.dim, split.start - start, split.stop - split.start)


def load_config(checkpoint: str | os.PathLike) -> tuple[DeepseekConfig, dict]:
    """The model config and the raw `config.json` dict."""
    path = Path(checkpoint) / "config.json"
    raw = _read_json(path)
    try:
        return DeepseekConfig.from_dict(raw), raw
    except (ValueError, TypeError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict, or CheckpointError naming it."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def load_model(checkpoint: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               device: torch.device | str = "cpu", parallel: Parallel | None = None) -> DeepseekForCausalLM:
    """The checkpoint's model, or with `parallel` this rank's part of it."""
    config, raw = load_config(checkpoint)
    block = weight_block_size(raw, Path(checkpoint) / "config.json")
    model = build_model(config, dtype, device, parallel)
    load_weights(model, checkpoint, block)
    return model


def weight_block_size(raw: dict, path: Path) -> tuple[int, int]:
    """config.json's `quantization_config.weight_block_size` (rows, columns of the block each `weight_scale_inv`
    entry scales), (128, 128) when not given."""
    quantization = raw.get("quantization_config") or {}
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{path}: quantization_config must be a JSON object, got {quantization!r}")
    block = quantization.get("weight_block_size", (128, 128))
    if not (isinstance(block, (list, tuple)) and len(block) == 2
            and all(is_int(b) and b > 0 for b in block)):
        per_tensor = " (per-tensor FP8 scales are not supported)" if block is None else ""
        raise CheckpointError(f"{path}: quantization_config.weight_block_size must be two positive ints, the rows "
                              f"and columns of a scale's block, got {block!r}{per_tensor}")
    return tuple(block)


def has_tokenizer(checkpoint: str | os.PathLike) -> bool:
    """Whether the checkpoint directory has tokenizer files."""
    return any((Path(checkpoint) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                                "tokenizer.model"))


def load_tokenizer(checkpoint: str | os.PathLike):
    """transformers' AutoTokenizer when the directory has tokenizer files, else None."""
    if not has_tokenizer(checkpoint):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(checkpoint)


# DeepSeek-V2-Lite's config.json (15.7B parameters, 2.4B active, about 31 GB in BF16; 16 heads, 64 routed experts of
# which 6 per token): the benchmarks' real-shape model with random weights.
V2_LITE_CONFIG = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy", scoring_func="softmax",
    norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense_replace=1, max_position_embeddings=163840,
    rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                      mscale=0.707, mscale_all_dim=0.707))


def tiny_config(model_type: str, **overrides) -> dict:
    """A small `config.json` dict of `model_type` (2 layers: dense then MoE with group-limited routing), keeping
    kv_lora_rank 512 and qk_rope_head_dim 64 so that the FP8 cache works."""
    config = dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32,
                  n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                  first_k_dense_replace=1, routed_scaling_factor=1.5, max_position_embeddings=512,
                  rope_theta=10000.0, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    if model_type == "deepseek_v2":
        config.update(topk_method="group_limited_greedy", norm_topk_prob=False)
    else:
        config.update(norm_topk_prob=True)
    if model_type == "deepseek_v32":
        config.update(index_n_heads=4, index_head_dim=128, index_topk=16)
    config.update(overrides)
    return config


def random_model(config: DeepseekConfig, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 seed: int = 0, std: float = 0.1, parallel: Parallel | None = None) -> DeepseekForCausalLM:
    """A model with random weights (normal(0, std) matrices, ones / zeros for norms and biases), drawn on `device`;
    with `parallel`, this rank's part of the same model (each matrix drawn whole, then cut)."""
    model = build_model(config, dtype, device, parallel)
    splits = parallel.splits if parallel is not None else {}
    generator = torch.Generator(device).manual_seed(seed)

    def draw(tensor: torch.Tensor, split) -> None:
        shape = list(tensor.shape)
        if split is not None:
            shape[split.dim] = split.size
        value = torch.randn(shape, generator=generator, device=tensor.device) * std
        if split is not None:
            value = value.narrow(split.dim, split.start, split.stop - split.start)
        _fill(tensor, value, split)

    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name.endswith(".experts.gate_up_proj"):  # the gate half then the up half, each drawn whole and cut
                prefix = name[:-len("gate_up_proj")]
                experts = model.get_submodule(prefix[:-1])
                draw(experts.gate_proj, splits.get(prefix + "gate_proj"))
                draw(experts.up_proj, splits.get(prefix + "up_proj"))
            elif tensor.dim() >= 2:
                draw(tensor, splits.get(name))
            elif name.endswith("norm.weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
    return model
