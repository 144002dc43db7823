"""The GPU's SM clock and what holds it below its maximum, for the benchmarks.

Stop 41 (docs/HISTORY.md) found that after heavy work (a large matmul, the sparse prefill rows) the H200 runs under its
software power cap for seconds: the SM clock at 1500-1860 MHz instead of 1980, and compute-bound rows up to 25%
slower (b128 h128 4k dense decode 316-354 us right after an 8192^3 matmul, 278-282 us 15 s later). So the benchmarks
wait for such a slowdown to clear before each row (`settle`) and record the clock and any slowdown reason each row
ended at (`read` right after its timing).

Readings come from NVML through nvidia-ml-py where it is installed, else from `nvidia-smi`; with neither (or no GPU)
`read` gives None and `settle` returns at once.
"""
import functools
import shutil
import subprocess
import time
from dataclasses import dataclass

# NVML's clocks-event (throttle) reason bits that slow the clock down; idle (0x1) and the application-clocks
# setting (0x2) do not.
SLOWDOWN_REASONS = {
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
}


@dataclass(frozen=True)
class ClockState:
    sm_mhz: int
    max_sm_mhz: int
    reasons: int  # NVML's bitmask

    @property
    def slowdowns(self) -> list[str]:
        return [name for bit, name in SLOWDOWN_REASONS.items() if self.reasons & bit]


def parse_smi(line: str) -> ClockState | None:
    """One line of `nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks_throttle_reasons.active
    --format=csv,noheader,nounits`, e.g. "1500, 1980, 0x0000000000000004"; None if it is not that."""
    fields = [field.strip() for field in line.split(",")]
    try:
        return ClockState(int(fields[0]), int(fields[1]), int(fields[2], 16))
    except (IndexError, ValueError):
        return None


@functools.cache
def _nvml():
    """nvidia-ml-py, initialised once, or None where it is not installed or finds no driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 (ImportError, or NVMLError without a driver)
        return None
    return pynvml


def _read_nvml(index: int) -> ClockState | None:
    pynvml = _nvml()
    if pynvml is None:
        return None
    # nvmlDeviceGetCurrentClocksEventReasons is the newer name of the same query.
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return ClockState(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                          pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM), reasons(handle))
    except pynvml.NVMLError:
        return None


def _read_smi(index: int) -> ClockState | None:
    if shutil.which("nvidia-smi") is None:
        return None
    # clocks_throttle_reasons is the older name of clocks_event_reasons; nvidia-smi takes both.
    query = "clocks.sm,clocks.max.sm,clocks_throttle_reasons.active"
    try:
        result = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={query}",
                                 "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_smi(result.stdout.strip().splitlines()[0]) if result.stdout.strip() else None


def read(device=None) -> ClockState | None:
    """The clock state of `device` (a torch device or index; the current CUDA device by default), or None."""
    import torch

    if not torch.cuda.is_available():
        return None
    index = device.index if isinstance(device, torch.device) else device
    index = torch.cuda.current_device() if index is None else index
    index = nvml_index(index)
    return _read_nvml(index) or _read_smi(index)


def nvml_index(cuda_index: int) -> int:
    """NVML's (and nvidia-smi's) index of CUDA device `cuda_index`: NVML ignores CUDA_VISIBLE_DEVICES, so under
    CUDA_VISIBLE_DEVICES=3 CUDA's device 0 is NVML's 3 (torch's mapping; the index itself where it cannot tell)."""
    import torch

    try:
        return torch.cuda._get_nvml_device_index(cuda_index)
    except Exception:  # noqa: BLE001 (no such helper in this torch, UUIDs NVML cannot resolve)
        return cuda_index


def settle(device=None, timeout_s: float = 20.0, poll_s: float = 0.25, reader=read, sleep=time.sleep) -> float | None:
    """Wait until `device` shows no slowdown reason (at most `timeout_s`); the seconds waited, or None without
    readings. A GPU that stays slowed (a lower power limit, a hot room) is timed as it is after the timeout."""
    waited = 0.0
    while True:
        state = reader(device)
        if state is None:
            return None
        if not state.slowdowns or waited >= timeout_s:
            return waited
        sleep(poll_s)
        waited += poll_s


def row_fields(state: ClockState | None, settled_s: float | None) -> dict:
    """What a benchmark row records: the SM clock its timing ended at, any slowdown then, and the wait before it."""
    if state is None:
        return {}
    return {"sm_clock_mhz": state.sm_mhz, "max_sm_clock_mhz": state.max_sm_mhz, "slowdowns": state.slowdowns,
            "settled_s": settled_s}
