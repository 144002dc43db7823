"""models/loading.py: FP8 block-quantized and sharded checkpoints, the MTP layer, and errors that name the tensor
and the file."""
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, load_model, loading
from models.loading import INDEX_FILE, SINGLE_FILE, checkpoint_names, dequantize_fp8_blocks

BLOCK = 128
FP8_MAX = 448.0


def quantize_fp8_blocks(weight: torch.Tensor, block_rows: int = BLOCK,
                        block_cols: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek V3's weight format: float8_e4m3fn values and a float32 `weight_scale_inv` per block of 128 x 128 (or
    the config's weight_block_size; partial last blocks included), value = fp8 * scale_inv."""
    rows, cols = weight.shape
    pad = torch.zeros(-(-rows // block_rows) * block_rows, -(-cols // block_cols) * block_cols)
    pad[:rows, :cols] = weight
    blocks = pad.view(pad.shape[0] // block_rows, block_rows, pad.shape[1] // block_cols, block_cols)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    expanded = scale_inv.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return (weight / expanded).to(torch.float8_e4m3fn), scale_inv


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """As DeepSeek V3 ships: the linear layers' weights, not the embeddings, lm_head, norms or the router."""
    return tensor.dim() == 2 and not any(k in name for k in ("embed_tokens", "lm_head", "mlp.gate.weight"))


def fp8_checkpoint(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as DeepSeek V3 stores them: quantized weights plus their `weight_scale_inv`."""
    stored = {}
    for name, tensor in tensors.items():
        if is_quantized(name, tensor):
            stored[name], stored[name[:-len("weight")] + "weight_scale_inv"] = quantize_fp8_blocks(tensor)
        else:
            stored[name] = tensor
    return stored


@pytest.fixture()
def v3_tensors(hf_checkpoints):
    path, _ = hf_checkpoints("deepseek_v3")
    tensors = load_file(path / SINGLE_FILE)
    # Row magnitudes from 1e-2 to 1e2: a scale applied to the wrong block shows as a large error.
    for name, tensor in tensors.items():
        if is_quantized(name, tensor):
            tensors[name] = tensor * torch.logspace(-2, 2, tensor.shape[0])[:, None]
    return path, tensors


def write_checkpoint(directory, source, tensors: dict, shards: int = 1) -> None:
    """config.json from `source`, and the tensors in one file or `shards` files with an index."""
    directory.mkdir(exist_ok=True)
    shutil.copy(source / "config.json", directory / "config.json")
    if shards == 1:
        save_file(tensors, directory / SINGLE_FILE)
        return
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = names[shard::shards]
        save_file({name: tensors[name].contiguous() for name in part}, directory / file)
        weight_map.update({name: file for name in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def edit_config(directory, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def loaded_weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor[expert] if expert is not None else tensor
            for name, (tensor, expert) in checkpoint_names(model).items()}


def test_dequantize_partial_blocks():
    weight = torch.randn(576, 200) * torch.logspace(-2, 2, 576)[:, None]
    fp8, scale_inv = quantize_fp8_blocks(weight)
    assert scale_inv.shape == (5, 2)
    restored = dequantize_fp8_blocks(fp8, scale_inv, (BLOCK, BLOCK))
    scale = scale_inv.repeat_interleave(BLOCK, 0)[:576].repeat_interleave(BLOCK, 1)[:, :200]
    # e4m3: 3 mantissa bits (relative error <= 2^-4), subnormal spacing 2^-9 of the block scale.
    assert ((restored - weight).abs() <= weight.abs() * 2 ** -4 + scale * 2 ** -10).all()


@pytest.mark.parametrize("shards", [1, 3])
def test_fp8_checkpoint_with_mtp_layer(tmp_path, v3_tensors, shards, caplog):
    """FP8 weights (kv_a_proj_with_mqa: 576 rows, partial blocks both ways) load to the original within FP8 error;
    in the sharded checkpoint weights and their scales land in different files; the MTP layer (config.json's
    num_nextn_predict_layers, as DeepSeek V3 and transformers' config ship it) is skipped."""
    source, tensors = v3_tensors
    stored = fp8_checkpoint(tensors)
    num_layers = json.loads((source / "config.json").read_text())["num_hidden_layers"]
    mtp = {name.replace("model.layers.1.", f"model.layers.{num_layers}."): t.clone()
           for name, t in stored.items() if name.startswith("model.layers.1.")}
    write_checkpoint(tmp_path / "fp8", source, {**stored, **mtp}, shards)
    edit_config(tmp_path / "fp8", num_nextn_predict_layers=1)
    with caplog.at_level(logging.INFO, logger="models.loading"):
        model = load_model(tmp_path / "fp8", dtype=torch.float32)
    assert f"multi-token-prediction layer(s) model.layers.{num_layers}-{num_layers}" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (5, 1)
    weights = loaded_weights(model)
    assert weights.keys() == tensors.keys()
    for name, original in tensors.items():
        if is_quantized(name, original):
            assert ((weights[name] - original).abs() <= original.abs() * 2 ** -4 + 1e-3 * original.abs().amax()
                    ).all(), name
        else:
            assert torch.equal(weights[name], original), name


def test_bf16_load_matches_checkpoint(hf_checkpoints):
    path, _ = hf_checkpoints("deepseek_v3")
    model = load_model(path, dtype=torch.bfloat16)
    for name, original in load_file(path / SINGLE_FILE).items():
        loaded = loaded_weights(model)[name]
        keep_fp32 = "mlp.gate." in name
        assert loaded.dtype == (torch.float32 if keep_fp32 else torch.bfloat16), name
        assert torch.equal(loaded, original if keep_fp32 else original.to(torch.bfloat16)), name


def broken_checkpoint(tmp_path, source, tensors, shards=1):
    write_checkpoint(tmp_path / "broken", source, tensors, shards)
    return tmp_path / "broken"


def test_missing_tensor(tmp_path, v3_tensors):
    source, tensors = v3_tensors
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[name]
    with pytest.raises(CheckpointError, match=rf"missing tensor {name} in .*{SINGLE_FILE}"):
        load_model(broken_checkpoint(tmp_path, source, tensors), dtype=torch.float32)


def test_unexpected_tensor(tmp_path, v3_tensors):
    source, tensors = v3_tensors
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"unexpected tensor model.layers.0.self_attn.q_proj.weight in .*{SINGLE_FILE}"):
        load_model(broken_checkpoint(tmp_path, source, tensors), dtype=torch.float32)


def test_wrong_shape(tmp_path, v3_tensors):
    source, tensors = v3_tensors
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors[name] = tensors[name][:-1]
    with pytest.raises(CheckpointError, match=rf"tensor {name} in .*{SINGLE_FILE} has shape"):
        load_model(broken_checkpoint(tmp_path, source, tensors), dtype=torch.float32)


def test_truncated_shard(tmp_path, v3_tensors):
    source, tensors = v3_tensors
    path = broken_checkpoint(tmp_path, source, tensors, shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: tensors \['model\.\S+'.*truncated"):
        load_model(path, dtype=torch.float32)


def test_layers_past_the_config_are_a_slice_with_a_warning(tmp_path, v3_tensors, caplog):
    """A config with fewer layers than its checkpoint (and no MTP layers) loads the first ones and warns that the
    rest were left out: not the MTP layers' silent skip."""
    source, tensors = v3_tensors
    path = broken_checkpoint(tmp_path, source, tensors)
    edit_config(path, num_hidden_layers=1, num_nextn_predict_layers=0)
    with caplog.at_level(logging.INFO, logger="models.loading"):
        model = load_model(path, dtype=torch.float32)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "model.layers.1-1" in warnings[0] and "num_hidden_layers = 1" in warnings[0]
    assert len(model.model.layers) == 1
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    assert torch.equal(loaded_weights(model)[name], tensors[name])


def test_scale_of_a_bf16_weight(tmp_path, v3_tensors):
    """A weight_scale_inv beside a weight that is not FP8 (a checkpoint cast to BF16 without applying its scales)."""
    source, tensors = v3_tensors
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    tensors[name + "_scale_inv"] = torch.full((1, 1), 100.0)
    with pytest.raises(CheckpointError, match=rf"tensor {name} in .*{SINGLE_FILE} is F32 but has a {name}_scale_inv"):
        load_model(broken_checkpoint(tmp_path, source, tensors), dtype=torch.float32)


def test_scale_without_its_weight(tmp_path, v3_tensors):
    source, tensors = v3_tensors
    name = "model.layers.0.self_attn.no_such_proj.weight_scale_inv"
    tensors[name] = torch.ones(1, 1)
    with pytest.raises(CheckpointError, match=rf"tensor {name} in .*{SINGLE_FILE} scales "
                                              rf"model.layers.0.self_attn.no_such_proj.weight, which"):
        load_model(broken_checkpoint(tmp_path, source, tensors), dtype=torch.float32)


@pytest.mark.parametrize("fp8", [False, True])
def test_index_names_the_wrong_shard(tmp_path, v3_tensors, fp8):
    """The index puts a tensor (or an FP8 weight's scale) in a shard that does not hold it."""
    source, tensors = v3_tensors
    stored = fp8_checkpoint(tensors) if fp8 else tensors
    path = broken_checkpoint(tmp_path, source, stored, shards=2)
    index = json.loads((path / INDEX_FILE).read_text())
    name = "model.layers.0.self_attn.kv_b_proj.weight" + ("_scale_inv" if fp8 else "")
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(file for file in shards if file != index["weight_map"][name])
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE} puts tensor {name} in .*, which does not hold it"):
        load_model(path, dtype=torch.float32)


def test_tied_embeddings_with_a_stored_lm_head(tmp_path, v3_tensors):
    """tie_word_embeddings: a checkpoint that also stores lm_head.weight loads (the embedding is the head)."""
    source, tensors = v3_tensors
    path = broken_checkpoint(tmp_path, source, tensors)
    edit_config(path, tie_word_embeddings=True)
    model = load_model(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_rope_frequencies_stay_float32_in_a_bf16_model():
    """A bf16 model keeps RoPE's inverse frequencies in float32 (bf16 would drift by radians at long positions)."""
    from models import random_model, tiny_config
    from models.deepseek import DeepseekConfig, rope_inv_freq

    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    model = random_model(config, torch.bfloat16)
    rotary = model.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, rope_inv_freq(config)[0].float())


TRANSFORMERS_CONFIGS = {"deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config",
                        "deepseek_v32": "DeepseekV32Config"}


@pytest.mark.parametrize("model_type", list(TRANSFORMERS_CONFIGS))
def test_left_out_fields_take_transformers_defaults(model_type):
    """A config.json without the routing fields (norm_topk_prob, routed_scaling_factor, n_group, ...) or the EOS id is
    read with what transformers' config class of its model_type gives them: the same routing, the same stop (before,
    a V3 config without them routed with V2's defaults, 1.0 and unnormalised: logits 17% off transformers')."""
    import transformers
    from models.deepseek import TRANSFORMERS_DEFAULTS, DeepseekConfig

    config_class = getattr(transformers, TRANSFORMERS_CONFIGS[model_type], None)
    if config_class is None:
        pytest.skip(f"this transformers has no {TRANSFORMERS_CONFIGS[model_type]}")
    theirs = config_class()
    for field, value in TRANSFORMERS_DEFAULTS[model_type].items():
        assert getattr(theirs, field, 0) == value, (field, getattr(theirs, field, 0), value)
    required = dict(model_type=model_type, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=32)
    ours = DeepseekConfig.from_dict(required)
    for field in ("norm_topk_prob", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
                  "q_lora_rank", "n_routed_experts", "num_experts_per_tok", "eos_token_id"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert DeepseekConfig.from_dict({**required, "routed_scaling_factor": 1.5}).routed_scaling_factor == 1.5


def test_models_are_built_in_the_ops_dtypes_only():
    """float16 passed build_model and failed at the first forward inside an op (or, V3 over a bf16 cache, ran with
    every expert computed for every token): refused up front."""
    from models import DeepseekConfig, random_model
    from models.loading import tiny_config

    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    with pytest.raises(ValueError, match="dtype must be torch.bfloat16 or torch.float32"):
        random_model(config, torch.float16)
    assert random_model(config, torch.bfloat16).lm_head.weight.dtype == torch.bfloat16


def test_unreadable_configs_and_indexes_name_their_file(tmp_path, v3_tensors):
    """A review's probes (stop 52): config.json that is not JSON, a model_type this zoo does not run, a config
    missing its sizes or giving one as a string, and an index without its weight_map gave a JSONDecodeError, a
    TypeError about __init__'s arguments, a comparison of int and str far inside, or a KeyError. Each is now a
    CheckpointError naming the file and what is wrong."""
    from models.loading import load_config
    source, tensors = v3_tensors
    config = json.loads((source / "config.json").read_text())
    for text, said in (("{not json", "cannot read"), (json.dumps({"model_type": "llama"}), "model_type must be one of"),
                       (json.dumps({"model_type": "deepseek_v3"}), "needs vocab_size"),
                       (json.dumps(dict(config, vocab_size=str(config["vocab_size"]))), "vocab_size must be an int"),
                       ("[1, 2]", "JSON object")):
        directory = tmp_path / f"case{len(text)}"
        directory.mkdir()
        (directory / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=rf"config\.json.*{said}|{said}.*config\.json"):
            load_config(directory)
    write_checkpoint(tmp_path / "sharded", source, tensors, shards=2)
    (tmp_path / "sharded" / INDEX_FILE).write_text("{}")
    with pytest.raises(CheckpointError, match=rf"{INDEX_FILE}.*weight_map"):
        load_model(tmp_path / "sharded", dtype=torch.float32)


def test_fp8_checkpoint_with_its_own_block_size(tmp_path, v3_tensors):
    """config.json's quantization_config.weight_block_size (here 128 rows x 64 columns, not square): the scales are
    read per block of that size, rows and columns each by their own size."""
    source, tensors = v3_tensors
    stored = {}
    for name, tensor in tensors.items():
        if is_quantized(name, tensor):
            stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(tensor, 128, 64)
        else:
            stored[name] = tensor
    write_checkpoint(tmp_path / "fp8", source, stored)
    edit_config(tmp_path / "fp8", quantization_config={"quant_method": "fp8", "weight_block_size": [128, 64]})
    weights = loaded_weights(load_model(tmp_path / "fp8", dtype=torch.float32))
    for name, original in tensors.items():
        if is_quantized(name, original):
            assert ((weights[name] - original).abs() <= original.abs() * 2 ** -4 + 1e-3 * original.abs().amax()
                    ).all(), name


def test_tied_embeddings_stored_under_the_head_name(tmp_path, v3_tensors):
    """tie_word_embeddings with the shared tensor stored once as lm_head.weight (safetensors' save_model keeps the
    first name of a shared tensor): it is the embedding, as transformers loads it (was: missing
    model.embed_tokens.weight)."""
    source, tensors = v3_tensors
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    path = broken_checkpoint(tmp_path, source, tensors, shards=2)
    edit_config(path, tie_word_embeddings=True)
    model = load_model(path, dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, tensors["lm_head.weight"])


def test_a_tensor_parallel_rank_checks_the_whole_scale(tmp_path, v3_tensors):
    """A weight_scale_inv of the wrong shape is refused by a tensor-parallel rank too, not only by one process: the
    rank's slice of a scale with twice the rows (blocks of 64 rows) had the shape its part expects, and loaded with
    the wrong scales (19% of the weight's largest value off)."""
    from models.loading import build_model, load_config, load_weights
    from models.parallel import Parallel

    source, tensors = v3_tensors
    stored = fp8_checkpoint(tensors)
    name = "model.layers.0.self_attn.q_b_proj.weight"  # 384 x 32, split by rows over the ranks
    stored[name], stored[name + "_scale_inv"] = quantize_fp8_blocks(tensors[name], 64, BLOCK)
    path = broken_checkpoint(tmp_path, source, stored)
    message = rf"{name}_scale_inv in .*{SINGLE_FILE}: scale_inv has shape \(6, 1\), expected \(3, 1\)"
    with pytest.raises(CheckpointError, match=message):
        load_model(path, dtype=torch.float32)
    config, _ = load_config(path)
    model = build_model(config, torch.float32, "cpu", Parallel(2, 1, 0, None))
    with pytest.raises(CheckpointError, match=message):
        load_weights(model, path)


@pytest.mark.parametrize("block", [None, [128], [0, 128], [128.0, 128.0], "128", [128, 128, 1]])
def test_malformed_weight_block_size(tmp_path, v3_tensors, block):
    """quantization_config.weight_block_size null (transformers' per-tensor FP8), of one or three sizes, zero, floats
    or a string: a CheckpointError naming config.json (was: TypeError, IndexError, ZeroDivisionError deep in the
    dequantization, or the third size ignored)."""
    source, tensors = v3_tensors
    path = broken_checkpoint(tmp_path, source, fp8_checkpoint(tensors))
    edit_config(path, quantization_config={"quant_method": "fp8", "weight_block_size": block})
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.weight_block_size must be two"):
        load_model(path, dtype=torch.float32)


def test_fp8_weights_are_dequantized_on_the_models_device(tmp_path, v3_tensors, monkeypatch):
    """The FP8 bytes and their scales go to the model's device before the multiply (a GPU's load then moves a quarter
    of the float32 bytes and multiplies there; dequantizing on the CPU took ~0.2 s per V3 expert weight). The meta
    device stands in for a GPU here."""
    source, tensors = v3_tensors
    write_checkpoint(tmp_path / "fp8", source, fp8_checkpoint(tensors))
    seen = []

    def recording(weight, scale_inv, block):
        seen.append((weight.device.type, scale_inv.device.type))
        return dequantize_fp8_blocks(weight, scale_inv, block)

    monkeypatch.setattr(loading, "dequantize_fp8_blocks", recording)
    model = load_model(tmp_path / "fp8", dtype=torch.float32, device="meta")
    assert seen and set(seen) == {("meta", "meta")}
    assert all(tensor.device.type == "meta" for tensor in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_fp8_checkpoint_loads_onto_the_gpu_as_onto_the_cpu(tmp_path, v3_tensors):
    """Dequantized on the GPU (each value one float32 product of an exact e4m3 value and its scale), the weights equal
    the CPU's bit for bit."""
    source, tensors = v3_tensors
    write_checkpoint(tmp_path / "fp8", source, fp8_checkpoint(tensors), shards=3)
    on_cpu = loaded_weights(load_model(tmp_path / "fp8", dtype=torch.float32))
    on_gpu = loaded_weights(load_model(tmp_path / "fp8", dtype=torch.float32, device="cuda"))
    assert on_gpu.keys() == on_cpu.keys()
    for name, weight in on_gpu.items():
        assert weight.is_cuda and torch.equal(weight.cpu(), on_cpu[name]), name


def test_fp8_weight_without_its_scale(tmp_path, v3_tensors):
    """An FP8 weight whose weight_scale_inv the checkpoint lacks is a CheckpointError naming both (untested before:
    without the check, a KeyError)."""
    source, tensors = v3_tensors
    stored = fp8_checkpoint(tensors)
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    del stored[name + "_scale_inv"]
    with pytest.raises(CheckpointError, match=rf"tensor {name} in .*{SINGLE_FILE} is float8_e4m3fn but "
                                              rf"{name}_scale_inv is missing"):
        load_model(broken_checkpoint(tmp_path, source, stored), dtype=torch.float32)


@pytest.mark.parametrize("block", [(128, 64), (32, 128)])
@pytest.mark.parametrize("dim, start, stop", [(0, 96, 192), (0, 250, 300), (1, 40, 200), (1, 64, 128)])
def test_a_part_of_an_fp8_weight_in_non_square_blocks(tmp_path, block, dim, start, stop):
    """A tensor-parallel rank's part of an FP8 weight in blocks of other rows than columns (weight_block_size) is
    that part of the whole weight: a column split steps by the block's columns, a row split by its rows (with square
    blocks only, reading every split by the block's rows passed every test)."""
    from safetensors import safe_open
    from models.parallel import Split

    weight = torch.randn(300, 200) * torch.logspace(-2, 2, 300)[:, None]
    fp8, scale_inv = quantize_fp8_blocks(weight, *block)
    path = tmp_path / SINGLE_FILE
    save_file({"w.weight": fp8, "w.weight_scale_inv": scale_inv}, path)
    files = {"w.weight": path, "w.weight_scale_inv": path}
    with safe_open(path, framework="pt") as f:
        whole = loading._read(f, path, "w.weight", files, block)
        part = loading._read(f, path, "w.weight", files, block, Split(dim, start, stop, weight.shape[dim]))
    assert torch.equal(part, whole.narrow(dim, start, stop - start))


def test_moe_layer_freq(tmp_path):
    """config.json's moe_layer_freq: past first_k_dense_replace only every moe_layer_freq-th layer is MoE, as DeepSeek's
    code builds it (was ignored: every layer past first_k_dense_replace was MoE, and such a checkpoint's dense layers
    were unexpected tensors)."""
    from models import DeepseekConfig, random_model, tiny_config

    config_dict = tiny_config("deepseek_v3", num_hidden_layers=4, moe_layer_freq=2)
    config = DeepseekConfig.from_dict(config_dict)
    assert [config.is_moe_layer(layer) for layer in range(4)] == [False, False, True, False]
    weights = loaded_weights(random_model(config))
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, tmp_path / SINGLE_FILE)
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    loaded = loaded_weights(load_model(tmp_path, dtype=torch.float32))
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[name], weights[name]) for name in weights)
    (tmp_path / "config.json").write_text(json.dumps({**config_dict, "moe_layer_freq": 0}))
    with pytest.raises(CheckpointError, match="moe_layer_freq must be at least 1"):
        load_model(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("routing", [dict(topk_group=0), dict(topk_group=5), dict(topk_group=None), dict(n_group=3)])
def test_group_limited_routing_needs_whole_groups(tmp_path, model_type, routing):
    """n_group that does not split the experts, or topk_group outside [1, n_group], is a CheckpointError naming
    config.json (was: a RuntimeError at the first forward, or with topk_group 0 every token sent to the same experts
    whatever its scores); greedy V2 routing and n_group 1 do not read them."""
    from models import tiny_config
    from models.loading import load_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_config(model_type, **routing)))
    with pytest.raises(CheckpointError, match=r"config\.json: group-limited routing .* needs n_routed_experts"):
        load_config(tmp_path)
    for unread in (dict(topk_method="greedy"), dict(n_group=1)):
        if model_type == "deepseek_v2" or "n_group" in unread:
            (tmp_path / "config.json").write_text(json.dumps(tiny_config(model_type, **{**routing, **unread})))
            load_config(tmp_path)
