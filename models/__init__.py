"""DeepSeek V2 / V3 / V3.2 on the flashmla ops: the model, checkpoint loading, the paged cache, generation."""
from pathlib import Path

from .cache import PagedKVCache
from .deepseek import DeepseekConfig, DeepseekForCausalLM, DecodeMetadata, PrefillMetadata, decode_metadata
from .generation import compile_decode_step, decode_step, generate, prefill, sample
from .loading import CheckpointError, build_model, load_model, load_tokenizer, random_model, tiny_config

# The tiny DeepSeek-V3.2-style checkpoint trained on the KJV (scripts/train_tiny.py), shipped with the package.
SHIPPED_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "deepseek-v32-tiny-kjv"

__all__ = [
    "CheckpointError",
    "DecodeMetadata",
    "DeepseekConfig",
    "DeepseekForCausalLM",
    "PagedKVCache",
    "PrefillMetadata",
    "SHIPPED_CHECKPOINT",
    "build_model",
    "compile_decode_step",
    "decode_metadata",
    "decode_step",
    "generate",
    "load_model",
    "load_tokenizer",
    "prefill",
    "random_model",
    "sample",
    "tiny_config",
]
