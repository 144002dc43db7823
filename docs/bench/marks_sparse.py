"""Milestones of every CTA of sparse prefill (h_q 64, s_kv 32k, s_q 1024: 1024 CTAs, ~7.8 a SM) on a FLASHMLA_PHASES
build with every grid row recorded: when each CTA entered, ended its prologue (Q landed, the first gathers issued and,
since stop 39, not waited for), its first block pair, its loop, began its output's stores, and exited (globaltimer, ns;
csrc/decode_common.cuh's CtaRecord). Summarises the medians of each milestone after entry and, per SM, the gap from
one CTA's exit to the next CTA's entry: the time a CTA's end and the next one's start cost outside any loop. Runs
topk 2048 and 256, each three times on one set of inputs. From the repository root on a Hopper GPU (stop 39):

    FLASHMLA_EXTRA_CUDA_FLAGS="-DFLASHMLA_PHASES -DFLASHMLA_CTA_RECORD_STRIDE=1" \\
        PYTHONPATH=$PWD:$PWD/scripts python docs/bench/marks_sparse.py
"""
import os
import re
import statistics
import subprocess
import sys
from collections import defaultdict

PATTERN = re.compile(r"cta \((\d+), (\d+), (\d+)\) sm (\d+): (\d+) \.\. (\d+) ns; .* at \+(-?\d+) \+(-?\d+) "
                     r"\+(-?\d+) \+(\d+) ns, stores from \+(-?\d+)")

if len(sys.argv) == 1:  # the parent: runs itself per topk and summarises what the launcher printed
    for topk in ("2048", "256"):
        child = subprocess.run([sys.executable, __file__, topk], capture_output=True, text=True, env=os.environ)
        if child.returncode != 0:
            sys.exit(f"topk {topk}: the run failed\n{child.stderr}")
        text = child.stdout
        for run in text.split("== run ")[1:]:
            header, *lines = run.splitlines()
            records = [[int(v) for v in m.groups()] for m in map(PATTERN.search, lines) if m]
            if not records:
                print(f"topk {topk} run {header.strip()}: no CTA records")
                continue
            first_entry = min(r[4] for r in records)
            print(f"topk {topk} run {header.strip()}: {len(records)} CTAs, first entry to last exit "
                  f"{max(r[5] for r in records) - first_entry} ns")
            for name, index in (("prologue end", 6), ("first pair end", 7), ("loop end", 8), ("stores start", 10),
                                ("exit", 9)):
                values = [r[index] for r in records if r[index] >= 0]
                if values:
                    print(f"    {name:15s} after entry: median {statistics.median(values):8.0f} ns, "
                          f"min {min(values):7d}, max {max(values):7d}")
            by_sm = defaultdict(list)
            for r in records:
                by_sm[r[3]].append((r[4], r[5]))
            gaps = []
            for spans in by_sm.values():
                spans.sort()
                gaps += [later[0] - earlier[1] for earlier, later in zip(spans, spans[1:])]
            if gaps:
                print(f"    exit to the next entry on the same SM: median {statistics.median(gaps):.0f} ns, "
                      f"min {min(gaps)}, max {max(gaps)} ({len(gaps)} gaps over {len(by_sm)} SMs)")
    sys.exit(0)

import torch  # noqa: E402

import flashmla_ops  # noqa: E402,F401
from bench_sparse import prefill_inputs  # noqa: E402
from flashmla_ops.kv_cache import D_QK, KV_LORA_RANK  # noqa: E402

topk = int(sys.argv[1])
q, kv, indices = prefill_inputs(1024, 32768, 64, topk, torch.device("cuda"))
for rep in range(3):
    torch.cuda.synchronize()
    print(f"== run {rep + 1}", flush=True)
    torch.ops.flashmla.sparse_prefill(q, kv, indices, D_QK ** -0.5, KV_LORA_RANK, None, None, 0)
    torch.cuda.synchronize()
