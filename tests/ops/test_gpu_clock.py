"""scripts/gpu_clock.py, which the benchmarks use to wait out a GPU's power or thermal slowdown before each timing
(stop 41: the same kernel 278 or 349 us depending on what ran before it) and to record the clock each row ended at:
nvidia-smi's line parsed, only the slowdown bits counted, and settle's waiting, with readings given to it."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SPEC = importlib.util.spec_from_file_location("gpu_clock", ROOT / "scripts" / "gpu_clock.py")
gpu_clock = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_clock)


def test_parses_nvidia_smi_and_counts_only_slowdown_reasons():
    state = gpu_clock.parse_smi("1500, 1980, 0x0000000000000004")
    assert (state.sm_mhz, state.max_sm_mhz, state.slowdowns) == (1500, 1980, ["sw_power_cap"])
    idle = gpu_clock.parse_smi("1980, 1980, 0x0000000000000001")  # GPU idle: not a slowdown
    assert idle.slowdowns == []
    both = gpu_clock.parse_smi("1410, 1980, 0x0000000000000024")
    assert both.slowdowns == ["sw_power_cap", "sw_thermal"]
    assert gpu_clock.parse_smi("[N/A], 1980, 0x0") is None
    assert gpu_clock.parse_smi("") is None


def readings(*states):
    """A reader that gives `states` in turn, then the last one for ever."""
    states = list(states)

    def reader(device):
        return states.pop(0) if len(states) > 1 else states[0]
    return reader


@pytest.mark.parametrize("slowed_readings, expected_wait", [(0, 0.0), (3, 0.75)])
def test_settle_waits_until_no_slowdown(slowed_readings, expected_wait):
    slowed, clear = gpu_clock.ClockState(1500, 1980, 0x4), gpu_clock.ClockState(1980, 1980, 0x0)
    sleeps = []
    waited = gpu_clock.settle(reader=readings(*[slowed] * slowed_readings, clear), poll_s=0.25, sleep=sleeps.append)
    assert waited == expected_wait and sleeps == [0.25] * slowed_readings


def test_settle_gives_up_after_its_timeout_and_without_readings():
    slowed = gpu_clock.ClockState(1500, 1980, 0x4)
    sleeps = []
    assert gpu_clock.settle(reader=readings(slowed), timeout_s=1.0, poll_s=0.25, sleep=sleeps.append) == 1.0
    assert len(sleeps) == 4
    assert gpu_clock.settle(reader=lambda device: None, sleep=sleeps.append) is None


def test_row_fields():
    assert gpu_clock.row_fields(None, None) == {}
    fields = gpu_clock.row_fields(gpu_clock.ClockState(1860, 1980, 0x4), 2.5)
    assert fields == {"sm_clock_mhz": 1860, "max_sm_clock_mhz": 1980, "slowdowns": ["sw_power_cap"], "settled_s": 2.5}


def test_reads_the_gpu_cuda_runs_on_under_cuda_visible_devices(monkeypatch):
    """NVML and nvidia-smi number every GPU of the host; CUDA only the visible ones: under CUDA_VISIBLE_DEVICES=3,5
    CUDA's device 0 is NVML's 3. Reading NVML's 0 settles on, and records the clock of, another GPU."""
    import torch

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    asked = []
    monkeypatch.setattr(gpu_clock, "_read_nvml",
                        lambda index: asked.append(index) or gpu_clock.ClockState(1980, 1980, 0))
    gpu_clock.read()
    gpu_clock.read(1)
    assert asked == [3, 5]
