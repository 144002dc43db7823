"""Stop 51: the Triton FP8 dense decode with P V's latent tiles loaded again (LaunchConfig.reload: each latent load
feeds one product, so Triton 3.6 pipelines both through shared memory by cp.async, `num_stages` tiles ahead) against
the default's prefetch of the next tile's bytes into registers, on the FP8 rows up to 16 query rows. CUDA-graph
medians (bench_decode.time_ms, settled up to 10 s), alternating rounds, each config's correctness checked against
the default's output first. From the repository root:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop51_triton_reload.py [rounds]
"""
import dataclasses
import sys

import torch

import bench_decode
from bench_decode import decode_bytes, make_inputs, time_ms
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK
from flashmla_ops.triton import decode as triton_decode

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 2
bench_decode.SETTLE_S = 10
device = bench_decode.bench_device("auto", "stop51_triton_reload.py")
ROWS = [("fp8 b128 h16 16k", 128, 1, 16, 16384), ("fp8 b8 h16 32k", 8, 1, 16, 32768),
        ("fp8 b1 h16 32k", 1, 1, 16, 32768), ("fp8 b128 s_q2 h8 4k", 128, 2, 8, 4096)]
for name, batch, s_q, h_q, seqlen in ROWS:
    sets, cache_seqlens = make_inputs(batch, s_q, h_q, [seqlen] * batch, True, device, 2)
    default = triton_decode.default_config(batch, s_q * h_q, device, is_fp8=True)
    base = dataclasses.replace(default, prefetch=False, reload=True)
    configs = {"default": default, "reload": base}
    configs["reload 2 stages"] = dataclasses.replace(base, num_stages=2)
    configs["reload 8 warps"] = dataclasses.replace(base, num_warps=8)
    configs["reload 64 tokens 8 warps"] = dataclasses.replace(base, block_n=64, num_warps=8)
    configs["reload bf16 products"] = dataclasses.replace(base, fp8_f16=False)
    if default.programs_per_sm == 2:
        configs["reload 1 program/SM"] = dataclasses.replace(base, programs_per_sm=1)

    def op(config):
        return lambda q, cache, block_table: triton_decode.dense_decode(
            q, cache, block_table, cache_seqlens, KV_LORA_RANK, D_QK ** -0.5, s_q > 1, True, None, config)
    expected, _ = op(default)(*sets[0])
    times = {label: [] for label in configs}
    for label, config in configs.items():
        got, _ = op(config)(*sets[0])
        error = ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()
        if error > 2 ** -6:
            print(f"{name} {label}: max error {error:.3g} of the default's largest value", flush=True)
    for round_index in range(ROUNDS):
        order = list(configs) if round_index % 2 == 0 else list(configs)[::-1]
        for label in order:
            times[label].append(time_ms(op(configs[label]), sets) * 1e3)
    gbytes = decode_bytes(batch, s_q, h_q, seqlen, True) / 1e3
    for label, config in configs.items():
        best = min(times[label])
        print(f"{name:22} {label:26} " + ", ".join(f"{t:.1f}" for t in times[label])
              + f" us  {gbytes / best:.0f} GB/s  ({config})", flush=True)
    del sets
    torch.cuda.empty_cache()
