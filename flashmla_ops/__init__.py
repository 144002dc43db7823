"""flashmla-ops: Multi-head Latent Attention ops (namespace `torch.ops.flashmla`) with CUDA kernels, plain-PyTorch
references and fake impls, plus FlashMLA's Python API."""
from . import decode, indexer, kv_cache, moe, reference, sparse_prefill  # noqa: F401  (registers the ops)
from ._ext import backend, reference_runs
from .decode import num_sm_parts
from .interface import FlashMLASchedMeta, flash_mla_sparse_fwd, flash_mla_with_kvcache, get_mla_metadata

__all__ = [
    "FlashMLASchedMeta",
    "backend",
    "flash_mla_sparse_fwd",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "num_sm_parts",
    "reference",
    "reference_runs",
]
