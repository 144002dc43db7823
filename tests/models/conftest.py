"""Tiny DeepSeek checkpoints written by transformers' own model classes (random weights, fp32, safetensors)."""
import pytest
import torch
import transformers

from models.loading import tiny_config

YARN = dict(type="yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.8, original_max_position_embeddings=128,
            beta_fast=32, beta_slow=1)
# Each variant's overrides of `tiny_config`: V2 without q_lora_rank and with group-limited softmax routing; V3 with
# YaRN (mscale != mscale_all_dim, so both the cos/sin factor and the softmax-scale factor matter); V3.2 with
# index_topk 16, below the prompt lengths, so that attention is really sparse.
VARIANTS = {
    "deepseek_v2": dict(q_lora_rank=None),
    "deepseek_v3": dict(rope_scaling=YARN),
    "deepseek_v32": dict(),
}
# V3.2 for the exact float32 comparisons, where the indexer's choice (index_topk 16, below the prompts) is compared:
# 32 indexer heads instead of 4, so that no key scores an exact 0 (every head's relu at 0), where ties would make the
# choice arbitrary (test_deepseek.py says more).
EXACT_V32 = dict(index_n_heads=32)


def save_hf_checkpoint(path, model_type: str, seed: int = 0, **overrides):
    """Save a random transformers `*ForCausalLM` of `tiny_config(model_type)` to `path`; returns the model (eval).

    Weights are normal(0, 0.1); vectors (norm weights, LayerNorm bias, e_score_correction_bias) are randomised too so
    that a mix-up between them shows."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**tiny_config(model_type, **{**VARIANTS[model_type], **overrides}),
                                               initializer_range=0.1)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn_like(param) if "norm.weight" in name else 0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.05 * torch.randn_like(buffer))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """(model_type, **overrides) -> (checkpoint dir, transformers model), each made once per session."""
    made = {}

    def get(model_type: str, **overrides):
        key = (model_type, repr(sorted(overrides.items())))  # repr: values may be dicts (rope_scaling)
        if key not in made:
            path = tmp_path_factory.mktemp(model_type)
            made[key] = (path, save_hf_checkpoint(path, model_type, **overrides))
        return made[key]

    return get


@pytest.fixture(scope="session")
def exact_v32_checkpoint(hf_checkpoints):
    """(checkpoint dir, transformers model) of V3.2 with `EXACT_V32` and tiny_config's index_topk 16."""
    return hf_checkpoints("deepseek_v32", **EXACT_V32)
