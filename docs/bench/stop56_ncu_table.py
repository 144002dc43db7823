"""Reads stop56_device_call2.sh's Nsight Compute CSVs (`--page raw`, one file a SPEC row) into one table: per kernel
its time, the DRAM bytes it moved against the bytes SPEC.md §4 counts for the row, its DRAM, L2, SM, tensor-pipe and
shared-memory activity, and its three largest stall reasons (warps stalled per issued instruction).

    python docs/bench/stop56_ncu_table.py DIR      # DIR holds ncu_row*.csv"""
import csv
import re
import sys
from pathlib import Path

STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
COLUMNS = {  # label: metric (percent of the peak, sustained over the kernel's elapsed or its SMs' active cycles)
    "DRAM %": "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
    "L2 %": "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "tensor %": "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active",  # wgmma issued or running
    "smem %": "l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_active",
    "issue %": "sm__issue_active.avg.pct_of_peak_sustained_elapsed",
}


SCALED = ("dram__bytes_", "lts__t_bytes", "gpu__time_duration")  # the byte and time metrics this reads


def number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def kernels(path: Path) -> tuple[str, list[dict]]:
    """The row's name and counted bytes (the script's own line) and its kernels' metrics, bytes in bytes and times in
    us whatever unit ncu chose (its raw page prints byte and ns here; a unit this does not know for a byte or time
    metric is an error, not a silent factor of 1)."""
    lines = path.read_text().splitlines()
    row = next((line for line in lines if line.startswith("row ")), path.stem)
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    table = list(csv.reader(lines[start:]))
    header, units, records = table[0], table[1], table[2:]
    scale = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "ns": 1e-3, "us": 1, "ms": 1e3}  # to bytes, us
    found = []
    for record in records:
        values = {}
        for name, unit, text in zip(header, units, record):
            value = number(text)
            if value is not None and unit not in scale and name.startswith(SCALED):
                raise ValueError(f"{path.name}: {name} in {unit!r}, a unit this reader does not know")
            values[name] = value * scale.get(unit, 1) if value is not None else text
        found.append(values)
    return row, found


def dram_bytes(values: dict) -> float:
    """Bytes the kernel read from and wrote to DRAM (0 where ncu gave no figure)."""
    return sum(value for value in (values.get("dram__bytes_read.sum"), values.get("dram__bytes_write.sum"))
               if isinstance(value, float))


def describe(values: dict) -> str:
    stalls = sorted(((values[name], match.group(1)) for name in values if (match := STALL.match(name))
                     and isinstance(values[name], float) and not match.group(1).endswith("selected")),
                    reverse=True)[:3]  # (not_)selected: issuing, or eligible and not picked; not stalls
    columns = [f"{label} {values[name]:.0f}" if isinstance(values.get(name), float) else f"{label} -"
               for label, name in COLUMNS.items()]
    moved = dram_bytes(values)
    kernel = re.sub(r"^void |\S*unnamed>::|decode::|\(.*", "", str(values.get("Kernel Name", "?"))).replace(", ", ",")
    return (f"  {kernel[:44]:<44} {values.get('gpu__time_duration.sum', 0):8.1f} us  DRAM {moved / 1e6:8.1f} MB  "
            + "  ".join(columns) + "  stalls: " + ", ".join(f"{name} {ratio:.1f}" for ratio, name in stalls))


def main():
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for path in sorted(folder.glob("ncu_row*.csv"), key=lambda p: int(re.sub(r"\D", "", p.stem))):
        try:
            row, found = kernels(path)
        except (StopIteration, IndexError):
            print(f"{path.name}: no ncu table")
            continue
        print(row)
        for values in found:
            print(describe(values))
        moved = sum(dram_bytes(values) for values in found)
        counted = re.search(r"counted (\d+) bytes", row)
        if counted:
            print(f"  all kernels: DRAM {moved / 1e6:.1f} MB moved against {int(counted.group(1)) / 1e6:.1f} MB "
                  "counted")


if __name__ == "__main__":
    main()
