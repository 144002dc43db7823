"""Argument checks shared by every op: they run before any compute, in the real and the fake impls.

A check names the op, the argument, what it saw and what it expected. Shapes are written as tuples of
ints (a fixed size), strings (a named size, bound the first time it is seen and equal everywhere after)
or None (any size).
"""
import math
import numbers
import os

import torch

DEBUG_ENV = "FLASHMLA_CHECK"
# Activations and BF16 caches: bfloat16 is the kernels' dtype; float32 runs the reference (exact model checks).
FLOAT_DTYPES = (torch.bfloat16, torch.float32)
FP8_LAYOUT_DTYPES = (torch.uint8, torch.float8_e4m3fn)  # FP8 caches: bytes, or e4m3 views of them


FLAG_VALUES = {"": False, "0": False, "false": False, "no": False, "off": False,
               "1": True, "true": True, "yes": True, "on": True}


def env_flag(name: str) -> bool:
    """A yes/no environment variable: unset, empty, 0/false/no/off or 1/true/yes/on (any case); anything else is a
    ValueError naming it (FLASHMLA_CHECK=false used to turn the checks on)."""
    value = os.environ.get(name, "")
    meaning = FLAG_VALUES.get(value.strip().lower())
    if meaning is None:
        raise ValueError(f"{name} must be 1 or 0 (or true/false, yes/no, on/off), got {value!r}")
    return meaning


def debug_checks() -> bool:
    """`FLASHMLA_CHECK=1` also checks index values of device tensors (one host sync per op call)."""
    return env_flag(DEBUG_ENV)


def _dtype_names(dtypes) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def require_tensor(op: str, name: str, t) -> torch.Tensor:
    """`t` if it is a tensor, else a TypeError naming `name` (before anything reads its dtype or shape)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    return t


def check_tensor(op: str, name: str, t, dtypes, shape, dims: dict, dtype_from: str | None = None) -> torch.Tensor:
    """`t` if it is a tensor of one of `dtypes` and of `shape`, else a TypeError (not a tensor, the dtype) or a
    ValueError (the shape) naming `name`. A size may also be (named size, constant): the named size plus the constant
    (an FP8 row: d_i values and a 4-byte scale). Sizes and dtypes that another argument set are said to come from it
    (`dtype_from`: the argument whose dtype `dtypes` is), so that the error does not blame only the second one."""
    require_tensor(op, name, t)
    if t.dtype not in dtypes:
        seen = str(t.dtype).replace("torch.", "")
        origin = f" (as {dtype_from} has it)" if dtype_from else ""
        raise TypeError(f"{op}: {name} must have dtype {_dtype_names(dtypes)}{origin}, got {seen}")
    want = "(" + ", ".join("*" if s is None else f"{s[0]} + {s[1]}" if isinstance(s, tuple) else str(s)
                           for s in shape) + ")"
    if t.dim() != len(shape):
        raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    for axis, (size, spec) in enumerate(zip(t.shape, shape)):
        if spec is None:
            continue
        if isinstance(spec, (str, tuple)):
            named, extra = (spec, 0) if isinstance(spec, str) else spec
            if named not in dims:  # not dims.setdefault: dynamo before torch 2.8 does not trace it
                dims[named] = size - extra
                dims["from", named] = name  # the error below names the argument that set it
            if dims[named] + extra != size:
                origin = dims.get(("from", named), "an earlier argument")
                raise ValueError(f"{op}: {name} must have shape {want} with {named}={dims[named]} (as {origin} has "
                                 f"it), got {tuple(t.shape)}")
        elif size != spec:
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
    return t


def check_fp8_flag(op: str, name: str, cache, flag: str, is_fp8, float_dtypes) -> None:
    """A cache of the other layout than its FP8 flag says (a uint8 cache without the flag, a BF16 one with it): a
    TypeError naming the flag too, which may be the wrong one."""
    if isinstance(cache, torch.Tensor) and (cache.dtype in FP8_LAYOUT_DTYPES) != bool(is_fp8):
        want = f"{_dtype_names(FP8_LAYOUT_DTYPES)} (the FP8 layout)" if is_fp8 else _dtype_names(float_dtypes)
        raise TypeError(f"{op}: {name} must have dtype {want} with {flag}={bool(is_fp8)}, got "
                        f"{str(cache.dtype).replace('torch.', '')}")


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {seen}")


def check_contiguous_last_dim(op: str, name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must be contiguous in its last dimension, got strides {t.stride()}")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has unit stride (what the kernels read), else a contiguous copy. (Not
    `t.contiguous()`: a tensor whose last dimension has size 1 counts as contiguous whatever that dimension's stride,
    e.g. a transposed `(batch, 1)` block table, and comes back unchanged.)"""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """An optional tensor as the kernels read it: contiguous (itself where it is), or None."""
    return None if t is None else t.contiguous()


def dense_aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` contiguous from a 16-byte aligned address, as the CUDA kernels read it (TMA, 16-byte vector loads): `t`
    itself, or a copy of a strided or misaligned view (e.g. rows viewed from a flat buffer one element in)."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def check_finite_scale(op: str, name: str, scale) -> None:
    """A softmax scale, finite (NaN or an infinity gives NaN outputs): the ops' real impls and the FlashMLA API check
    it here. While torch.compile traces, the scale may be symbolic (d_qk ** -0.5 of a dynamic d_qk; a float argument
    that became dynamic when a call with another value recompiled): it has no value to test, and math.isfinite on it
    cannot be traced (fullgraph failed), so like the ops' value checks (`value_checks_apply`) it is skipped then; the
    compiled graph's real call checks it."""
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool) or torch.compiler.is_compiling():
        return
    try:
        finite = math.isfinite(scale)
    except OverflowError:  # an int past float's range
        finite = False
    if not finite:
        raise ValueError(f"{op}: {name} must be finite, got {scale}")


def is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def is_float(value) -> bool:  # a 0-d tensor too (not a bool one), which the op schemas' float arguments take
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and value.dtype != torch.bool
    return (is_int(value) or isinstance(value, (numbers.Real, torch.SymFloat))) and not isinstance(value, bool)


def is_flag(value) -> bool:  # bool, numpy's bool, or the int 0 or 1 (the schemas' bool arguments take any int)
    kind = type(value)
    return ((isinstance(value, numbers.Integral) and value in (0, 1))
            or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_")))


def check_scalar(op: str, name: str, value, accepts, what: str) -> None:
    """A scalar argument of the wrong kind (None, a string, a list): a TypeError naming it. For what no op schema
    guards (the ops' schemas turn their scalars into ints, floats and bools, or reject them with a RuntimeError): the
    FlashMLA API (it names itself before the op's schema speaks) and the public references (a head_dim_v of None
    raised from a comparison inside, a causal of "no" was true). Numpy scalars are taken."""
    if not accepts(value):
        raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")


def check_scale(op: str, name: str, value, what: str = "a float"):
    """A softmax scale: a float (see check_scalar), finite: NaN or an infinity would give NaN or infinite outputs.
    Returns it; a 0-d tensor (which the op schemas' float arguments take) as its value, read here once where the
    schema would have read it (a sync with its device either way), so that it is checked as a float is."""
    check_scalar(op, name, value, is_float, what)
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.is_meta:
            raise TypeError(f"{op}: {name} must be a real number or a 0-d real tensor with a value, got a "
                            f"{value.dtype} tensor on {value.device}")
        value = value.item()
    check_finite_scale(op, name, value)
    return value


def check(op: str, ok, message: str) -> None:
    """Value check: `ok` is a bool or a bool tensor (all true)."""
    if isinstance(ok, torch.Tensor):
        ok = bool(ok.all())
    if not ok:
        raise ValueError(f"{op}: {message}")


def value_checks_apply(t: torch.Tensor) -> bool:
    """Whether the values of `t` are checked: always on CPU, on a device only under FLASHMLA_CHECK=1
    (it syncs), never while tracing (fake/meta tensors, torch.compile's trace of the Python API around the ops) or
    capturing a CUDA graph."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor) or torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    if capturing(t):
        return False
    return debug_checks()


def capturing(t: torch.Tensor) -> bool:
    """Whether `t` is a CUDA tensor and its device's current stream is capturing a CUDA graph: nothing may sync with
    the host then (it raises), and what is captured is replayed for whatever values the tensors hold later."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def check_no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """A tensor an op writes must not reach one element from two indices (e.g. a cache made by `expand`: a write to
    one block would land in another). Sufficient and cheap: dimensions of size > 1, by decreasing stride, each stride
    past the extent of the dimensions inside it."""
    extent = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda d: d[1]):
        if stride < extent:
            raise ValueError(f"{op}: {name} must not overlap itself (each element its own memory), got shape "
                             f"{tuple(t.shape)} with strides {t.stride()}")
        extent = stride * (size - 1) + extent


def below(values: torch.Tensor, bound: int) -> torch.Tensor:
    """`values < bound` for an integer tensor and a Python bound: past the dtype's range torch's comparison wraps the
    bound (an int32 tensor's `< 2**31` is false everywhere), so such a bound holds every value below it (a cache of
    2**31 slots or more, with int32 indices)."""
    if bound > torch.iinfo(values.dtype).max:
        return torch.ones_like(values, dtype=torch.bool)
    return values < bound


def check_paged_table(op: str, block_table: torch.Tensor, cache_seqlens: torch.Tensor, num_blocks: int,
                      page_block_size: int, cache_name: str) -> None:
    """Values of a paged table: 0 <= cache_seqlens <= capacity, and the block_table entries of the blocks each
    sequence uses within [0, num_blocks) (unused entries may hold anything)."""
    if not value_checks_apply(cache_seqlens):
        return
    blocks_per_seq = block_table.shape[1]
    capacity = blocks_per_seq * page_block_size
    lengths = cache_seqlens.tolist() if cache_seqlens.numel() <= 16 else "values out of range"
    check(op, (cache_seqlens >= 0) & below(cache_seqlens, capacity + 1),
          f"cache_seqlens must be in [0, {capacity}] (block_table holds {blocks_per_seq} blocks of "
          f"{page_block_size}), got {lengths}")
    first_token = torch.arange(blocks_per_seq, device=block_table.device)[None, :] * page_block_size
    bad = (first_token < cache_seqlens[:, None]) & ((block_table < 0) | ~below(block_table, num_blocks))
    check(op, ~bad, f"block_table entries for the blocks each sequence uses must be in [0, {num_blocks}) "
                    f"(num_blocks of {cache_name}), got {block_table[bad][:8].tolist()}")
