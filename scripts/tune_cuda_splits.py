"""Time the CUDA dense decode at small batches for several CUDA_MIN_BLOCKS_PER_SPLIT values (the split policy's
floor on 64-token blocks per split), next to the Triton kernel. Timing as bench_decode.py (CUDA-graph medians).

    python scripts/tune_cuda_splits.py [--out tune_splits.json]
"""
import argparse
import json

import torch

from bench_decode import bench_config, forced_backend

import flashmla_ops
from flashmla_ops import decode

SHAPES = [(1, 16, 1024), (1, 16, 4096), (4, 16, 1024), (1, 128, 1024), (16, 16, 1024), (1, 128, 32768),
          (8, 16, 32768)]  # (batch, h_q, seqlen)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors", default="1,2,4")
    parser.add_argument("--out", default="tune_splits.json")
    args = parser.parse_args()
    floors = [int(f) for f in args.floors.split(",")]
    if min(floors) < 1:
        parser.error(f"--floors must all be >= 1, got {floors}")
    if not torch.cuda.is_available():
        raise SystemExit("tune_cuda_splits.py needs a CUDA GPU")
    device = torch.device("cuda")
    with forced_backend("cuda"):
        if flashmla_ops.backend("dense_decode", device) != "cuda":
            raise SystemExit("tune_cuda_splits.py: the CUDA dense decode kernel is not built here")
    rows = []
    print(f"{'batch':>5} {'h_q':>4} {'seqlen':>6} " + " ".join(f"{'floor ' + str(f):>9}" for f in floors)
          + f" {'triton':>9}  (us)")
    for batch, h_q, seqlen in SHAPES:
        row = {"batch": batch, "h_q": h_q, "seqlen": seqlen}
        for floor in floors:
            decode.CUDA_MIN_BLOCKS_PER_SPLIT = floor
            with forced_backend("cuda"):
                row[f"floor_{floor}"] = bench_config(batch, 1, h_q, [seqlen] * batch, False, device, False)["time_us"]
        with forced_backend("triton"):
            row["triton"] = bench_config(batch, 1, h_q, [seqlen] * batch, False, device, False)["time_us"]
        rows.append(row)
        print(f"{batch:>5} {h_q:>4} {seqlen:>6} " + " ".join(f"{row[f'floor_{f}']:>9.1f}" for f in floors)
              + f" {row['triton']:>9.1f}")
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
