"""Portable Triton kernels behind the `flashmla` ops (any NVIDIA GPU Triton supports).

The ops send only CUDA tensors here (CPU tensors run their reference); these modules' functions also run on CPU
tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the CPU tests check the kernels. Imported lazily
by the ops, so that TRITON_INTERPRET can be set before the kernels are defined.
"""
