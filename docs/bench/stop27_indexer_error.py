"""Errors of the CUDA e4m3 indexer logits against the float32 reference: as a fraction of the largest logit and of
A = sum_h |w| |q_scale k_scale| sum_d |q_d k_d| (the absolute sum the MMAs add)."""
import sys
import torch
sys.path.insert(0, "tests/ops")  # run from the repository root: python docs/bench/stop27_indexer_error.py
from test_cuda_indexer_logits import inputs, causal_ranges
from flashmla_ops.indexer import indexer_logits_reference

for s_q, s_kv, h_i in [(7, 150, 3), (19, 67, 8), (300, 700, 64), (64, 4096, 1), (64, 4096, 3), (64, 4096, 16),
                       (256, 8192, 64)]:
    for seed in range(3):
        args = inputs(s_q, s_kv, h_i, *causal_ranges(s_q, s_kv), seed=seed * 100 + s_q)
        got = torch.ops.flashmla.indexer_logits(*args)
        want = indexer_logits_reference(*args)
        q, k, w, ks, ke, qs, kscale = args
        qa = (q.float() * qs[..., None]).abs()
        ka = (k.float() * kscale[:, None]).abs()
        absolute = indexer_logits_reference(qa, ka, w.abs(), ks, ke)
        finite = torch.isfinite(want)
        err = (got - want).abs()[finite]
        print(f"s_q {s_q} s_kv {s_kv} h_i {h_i} seed {seed}: err/max|logit| {(err.max() / want[finite].abs().max()).item():.3e}"
              f"  max err/A {(err / absolute[finite].clamp_min(1e-30)).max().item():.3e}"
              f"  mean err/A {(err / absolute[finite].clamp_min(1e-30)).mean().item():.3e}")
