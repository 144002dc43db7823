"""Whether the narrow decode kernel's CTAs finish apart because of the SM they run on: on a FLASHMLA_PHASES build
recording every CTA (-DFLASHMLA_CTA_RECORD_STRIDE=1), runs a shape RUNS times (one op call each, the cache rotated so
that it comes from DRAM) and reads each CTA's SM and loop end (csrc/decode_common.cuh's CtaRecord). Every CTA has the
same work (a uniform split), so an SM that is slow in every run points at its place in the GPU (its GPC's share of
the memory system), and uncorrelated runs at the memory system's own spread. Prints the runs' spread, the correlation
of the SMs' loop ends between runs, and the SMs' mean deviation in SM order. From the repository root on a Hopper
GPU (stop 65):

    FLASHMLA_EXTRA_CUDA_FLAGS="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1" \
        PYTHONPATH=$PWD:$PWD/scripts python docs/bench/stop65_sm_spread.py 8:32768:16 128:4096:16
"""
import os
import re
import statistics
import subprocess
import sys

RUNS = 6
RECORD = re.compile(r"cta \((\d+), (\d+), (\d+)\) sm (\d+): (\d+) \.\. (\d+) ns; .* at \+(-?\d+) \+(-?\d+) \+(-?\d+) "
                    r"\+(\d+) ns")


def child(batch: int, seqlen: int, h_q: int) -> None:
    import torch
    from bench_decode import make_inputs
    from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK  # the package import registers the ops
    sets, lens = make_inputs(batch, 1, h_q, [seqlen] * batch, False, torch.device("cuda"), 2)
    for run in range(RUNS + 1):  # the first call builds and warms up; its records are not read
        q, cache, table = sets[run % 2]
        torch.cuda.synchronize()
        print(f"== run {run}", flush=True)
        torch.ops.flashmla.dense_decode(q, cache, table, lens, None, None, KV_LORA_RANK, D_QK ** -0.5, False, False,
                                        None)
        torch.cuda.synchronize()
        sys.stdout.flush()


def correlation(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def parent(shape: str) -> None:
    batch, seqlen, h_q = shape.split(":")
    text = subprocess.run([sys.executable, __file__, "--child", batch, seqlen, h_q], capture_output=True, text=True,
                          env=os.environ).stdout
    runs = []  # per run: {sm: loop end after entry, ns}
    for run in text.split("== run ")[2:]:
        loop_ends = {}
        for match in map(RECORD.search, run.splitlines()):
            if match:
                sm, loop_end = int(match.group(4)), int(match.group(9))
                loop_ends[sm] = loop_end
        runs.append(loop_ends)
    sms = sorted(set.intersection(*(set(run) for run in runs)))
    print(f"== b{batch} h{h_q} {int(seqlen) // 1024}k: {len(runs)} runs, {len(sms)} SMs in every run")
    for i, run in enumerate(runs):
        values = list(run.values())
        print(f"   run {i + 1}: loop end min {min(values)}, median {statistics.median(values):.0f}, "
              f"max {max(values)} ns")
    pairs = [correlation([runs[i][sm] for sm in sms], [runs[j][sm] for sm in sms])
             for i in range(len(runs)) for j in range(i + 1, len(runs))]
    print(f"   correlation of the SMs' loop ends between runs: median {statistics.median(pairs):.2f}, "
          f"min {min(pairs):.2f}, max {max(pairs):.2f}")
    deviation = {sm: statistics.fmean(run[sm] - statistics.median(run.values()) for run in runs) for sm in sms}
    print("   mean deviation from the run's median by SM (us): " +
          " ".join(f"{sm}:{deviation[sm] / 1e3:+.1f}" for sm in sms))


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(*map(int, sys.argv[2:5]))
    else:
        for shape in sys.argv[1:]:
            parent(shape)
