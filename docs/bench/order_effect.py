"""The dense h128 rows' order effect (stop 40, docs/HISTORY.md): the same kernels time b128 h128 4k at ~275-285 us
in most processes and ~335-349 us in others, e.g. right after `measure_ceilings` (stop 40 call 7). This separates the
two explanations left: a state of the process or GPU (then inputs allocated before the step slow down with it), or
where the step leaves the next allocations (then only inputs allocated after it do). Each child process times, with
CUDA graphs as bench_decode.py does: set A allocated first; measure_ceilings; A again; set B allocated after it;
A and B once more; both again after 15 s idle (a throttled GPU recovers). Each line carries nvidia-smi's clocks,
power, temperatures and throttle reasons. Children run under the default allocator and under
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (segments that PyTorch maps itself), two processes each.
From the repository root on a Hopper GPU:

    PYTHONPATH=$PWD:$PWD/scripts python docs/bench/order_effect.py
"""
import os
import subprocess
import sys

if len(sys.argv) == 1:  # the parent
    for alloc_conf in ("", "expandable_segments:True"):
        for run in range(2):
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=alloc_conf)
            result = subprocess.run([sys.executable, __file__, "child"], capture_output=True, text=True, env=env)
            lines = [line for line in result.stdout.splitlines() if line.startswith("  ")]
            print(f"allocator {alloc_conf or 'default'}, process {run + 1}:", *lines,
                  result.stderr[-2000:] if result.returncode else "", sep="\n", flush=True)
    sys.exit(0)

import time  # noqa: E402

import torch  # noqa: E402

from bench_decode import make_inputs, measure_ceilings, time_ms  # noqa: E402
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK  # noqa: E402

device = torch.device("cuda")
lengths = [4096] * 128


def inputs():  # (sets, cache_seqlens): one set, 128 sequences of 4k
    return make_inputs(128, 1, 128, lengths, False, device, 1)


def timed(sets, cache_seqlens):
    def op(q, cache, block_table):
        return torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, KV_LORA_RANK,
                                               D_QK ** -0.5, False, False, None)
    return time_ms(op, sets) * 1e3


def gpu_state() -> str:
    """Clocks, power, temperature and the active throttle reasons (nvidia-smi), to tell a slowed GPU apart."""
    query = "clocks.sm,clocks.mem,power.draw,temperature.gpu,temperature.memory,clocks_throttle_reasons.active"
    result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                            text=True)
    return result.stdout.strip() or result.stderr.strip()[-200:]


def report(label, value):
    print(f"  {label:28s} {value:7.1f} us   [{gpu_state()}]", flush=True)


a = inputs()
report("A first", timed(*a))
measure_ceilings(device)
report("A after ceilings", timed(*a))
b = inputs()
report("B (allocated after)", timed(*b))
report("A", timed(*a))
report("B", timed(*b))
time.sleep(15)
report("A after 15 s idle", timed(*a))
report("B after 15 s idle", timed(*b))
