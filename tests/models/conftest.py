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
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(model_type)
            made[key] = (path, save_hf_checkpoint(path, model_type, **overrides))
        return made[key]

    return get
