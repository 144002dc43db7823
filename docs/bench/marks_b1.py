"""Milestones of each CTA of the wide decode kernel at b1 h128 (split: 66 pieces x 2 row tiles) and, for contrast,
b128 h128 4k (one piece a CTA): on a FLASHMLA_PHASES build every CTA of split rows (and of every 16th sequence)
records when it entered, when its prologue (Q, the first stages' issue) ended, when its first block pair ended, when
its loop ended, when the output's stores began (after the barrier that waits for both warpgroups) and when it exited
(globaltimer, ns; csrc/decode_common.cuh's CtaRecord), and the launcher prints them. Runs each shape three times on
one set of inputs (the first with a cache that has not been read: from DRAM) and summarises each run's records: the
spread of the entries, and the medians and maxima of each milestone after entry. From the repository root on a
Hopper GPU (stop 35):

    FLASHMLA_EXTRA_CUDA_FLAGS=-DFLASHMLA_PHASES PYTHONPATH=$PWD:$PWD/scripts python docs/bench/marks_b1.py

MARKS_SHAPES (batch:seqlen:h_q, comma-separated) picks other shapes; at 16 rows or fewer they run the narrow kernel
(stop 40), whose marks are Q landed, warpgroup 0's first own block done, the loop's end (each warpgroup's), and the
partial's stores starting (after the warpgroups' exchange), printed under the same names, and (stop 66) when thread 0
had issued its stores and passed the piece's last barrier.
"""
import os
import re
import statistics
import subprocess
import sys

# batch:seqlen:h_q of each shape; MARKS_SHAPES="1:32768:16,1:8192:16" times the narrow kernel's (stop 40)
SHAPES = os.environ.get("MARKS_SHAPES", "1:32768:128,1:8192:128,128:4096:128")

if len(sys.argv) == 1:  # the parent: runs itself per shape and summarises what the launcher printed
    for batch, seqlen, h_q in (shape.split(":") for shape in SHAPES.split(",")):
        text = subprocess.run([sys.executable, __file__, batch, seqlen, h_q], capture_output=True, text=True,
                              env=os.environ).stdout
        runs = text.split("== run ")[1:]
        for run in runs:
            header, *lines = run.splitlines()
            records = [re.search(r"cta \((\d+), (\d+), (\d+)\) sm \d+: (\d+) \.\. (\d+) ns; .* at \+(-?\d+) \+(-?\d+) "
                                 r"\+(-?\d+) \+(\d+) ns, stores from \+(-?\d+)(?:, stored \+(-?\d+), synced "
                                 r"\+(-?\d+))?", line) for line in lines]
            records = [[int(v) if v is not None else -1 for v in m.groups()] for m in records if m]
            if not records:
                continue
            first_entry = min(r[3] for r in records)
            last_exit = max(r[4] for r in records)
            print(f"b{batch} h{h_q} {int(seqlen) // 1024}k run {header.strip()}: {len(records)} CTAs, "
                  f"entries spread {max(r[3] for r in records) - first_entry} ns, first entry to last exit "
                  f"{last_exit - first_entry} ns")
            for name, index in (("prologue end", 5), ("first pair end", 6), ("loop end", 7), ("stores start", 9),
                                ("stores issued", 10), ("last barrier", 11), ("exit", 8)):
                values = [r[index] for r in records if r[index] >= 0]
                if values:
                    print(f"    {name:15s} after entry: median {statistics.median(values):8.0f} ns, "
                          f"min {min(values):7d}, max {max(values):7d} ({len(values)} CTAs)")
            if header.strip().startswith("3"):
                print("    (run 3, all records)\n      " + "\n      ".join(
                    line.split(": ", 1)[0] + ": " + line.split("; ", 1)[1] for line in lines[:12] if "cta" in line))
    sys.exit(0)

import torch
import flashmla_ops  # noqa: F401
from bench_decode import make_inputs, KV_LORA_RANK, D_QK
from flashmla_ops.decode import cuda_num_splits

batch, seqlen, h_q = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
dev = torch.device("cuda")
sets, lens = make_inputs(batch, 1, h_q, [seqlen] * batch, False, dev, 1)
q, cache, table = sets[0]
splits = cuda_num_splits(dev, batch, h_q, table.shape[1])
for rep in range(3):
    torch.cuda.synchronize()
    print(f"== run {rep + 1} (splits {splits})", flush=True)
    torch.ops.flashmla.dense_decode(q, cache, table, lens, None, None, KV_LORA_RANK, D_QK ** -0.5, False, False, None)
    torch.cuda.synchronize()
    sys.stdout.flush()
