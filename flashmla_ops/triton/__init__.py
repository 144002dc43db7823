"""Portable Triton kernels behind the `flashmla` ops (any NVIDIA GPU Triton supports; CPU under TRITON_INTERPRET=1).

Imported lazily by the ops, so that TRITON_INTERPRET can be set before the kernels are defined.
"""
