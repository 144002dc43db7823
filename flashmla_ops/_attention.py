"""The one softmax-attention core every reference op uses: exact, FP32, chunked over keys (online softmax).

    logits[t, h, k] = scale * q[t, h] . kv[t, k]            (kv rows are shared by all heads: MQA)
    lse[t, h]       = log(sum_k valid[t, k] * exp(logits))  (natural log; +inf when nothing is valid)
    out[t, h]       = sum_k softmax(logits)[k] * kv[t, k, :d_v]   (0 when nothing is valid)
"""
import torch

ELEMENTS_PER_CHUNK = 1 << 24  # bounds the (tokens, heads, keys) logits tile: 64 MiB of float32


def attend(q: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor, scale: float, d_v: int):
    """q `(T, h, d_qk)`; kv `(T or 1, K, d_qk)`; valid `(T, K)` bool.

    Returns out `(T, h, d_v)`, lse `(T, h)`, max_logits `(T, h)` (the largest valid scaled logit, -inf if none),
    all float32. Duplicate keys count as often as they appear.
    """
    num_tokens, num_heads, _ = q.shape
    num_keys = kv.shape[1]
    q = q.float()
    running_max = q.new_full((num_tokens, num_heads), float("-inf"))
    running_sum = q.new_zeros((num_tokens, num_heads))
    acc = q.new_zeros((num_tokens, num_heads, d_v))
    key_chunk = max(64, ELEMENTS_PER_CHUNK // max(1, num_tokens * num_heads))
    for start in range(0, num_keys, key_chunk):
        keys = kv[:, start:start + key_chunk].float()
        logits = torch.matmul(q, keys.transpose(1, 2)) * scale
        logits = logits.masked_fill(~valid[:, None, start:start + key_chunk], float("-inf"))
        new_max = torch.maximum(running_max, logits.amax(-1))
        shift = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(logits - shift[..., None])
        rescale = torch.exp(running_max - shift)
        running_sum = running_sum * rescale + probs.sum(-1)
        acc = acc * rescale[..., None] + torch.matmul(probs, keys[..., :d_v])
        running_max = new_max
    empty = running_sum == 0
    lse = torch.where(empty, torch.full_like(running_sum, float("inf")), running_max + torch.log(running_sum))
    out = torch.where(empty[..., None], torch.zeros_like(acc), acc / running_sum.clamp_min(1e-30)[..., None])
    return out, lse, running_max


def apply_attn_sink(out: torch.Tensor, lse: torch.Tensor, attn_sink: torch.Tensor | None) -> torch.Tensor:
    """out * exp(lse) / (exp(lse) + exp(sink)); `lse` `(..., h)` matches `out` `(..., h, d_v)`; lse is unchanged."""
    if attn_sink is None:
        return out
    return out * sink_factor(lse, attn_sink)[..., None]


def sink_factor(lse: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink), float32; 1 for a query that saw nothing (lse +inf,
    out 0: whatever the sink, +inf included, which would make it NaN)."""
    return torch.where(torch.isposinf(lse), 1.0, torch.sigmoid(lse - attn_sink.float()))
