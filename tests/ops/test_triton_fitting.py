"""On GPUs with less shared memory per block than Hopper's, the Triton ops fall back to smaller tiles
(common.launch_fitting): the first config the GPU holds is used, is remembered, and computes the same result.

The refusals are simulated here, as Triton makes them: OutOfResources when it loads a kernel too big for the GPU,
before anything is launched. Which configs a real sm_80, sm_89 or sm_120 holds is checked by compiling them
(test_triton_compile.py)."""
import functools

import pytest

triton_common = pytest.importorskip("flashmla_ops.triton.common", exc_type=ImportError)
from flashmla_ops.triton import decode as triton_decode  # noqa: E402
from flashmla_ops.triton import sparse as triton_sparse  # noqa: E402
from decode_inputs import POISONED_RUNS  # noqa: E402
from test_triton_decode import run_and_compare  # noqa: E402
from test_triton_sparse import run_decode, run_prefill  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton_recording import RecordingKernel  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch):
    """Each test starts with no remembered choice and leaves none behind (the refusals below are fake)."""
    monkeypatch.setattr(triton_common, "_FITTING", {})


def test_launch_fitting_says_once_which_tiles_it_runs_instead(caplog):
    def launch(config):
        if config > 2:
            raise OutOfResources(config * 65536, 2 * 65536, "shared memory")

    with caplog.at_level("INFO", logger="flashmla_ops"):
        triton_common.launch_fitting(("sparse_decode", 4), [4, 3, 2], launch)
        triton_common.launch_fitting(("sparse_decode", 4), [4, 3, 2], launch)
        triton_common.launch_fitting(("dense_decode", 1), [1, 0], launch)  # the first fits: nothing to say
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 1 and "sparse_decode" in lines[0] and "running 2" in lines[0], lines


def test_launch_fitting_takes_the_first_config_that_fits_and_remembers_it():
    tried = []

    def launch(config):
        tried.append(config)
        if config > 2:
            raise OutOfResources(config * 65536, 2 * 65536, "shared memory")

    triton_common.launch_fitting("op", [4, 3, 2, 1], launch)
    assert tried == [4, 3, 2]
    tried.clear()
    triton_common.launch_fitting("op", [4, 3, 2, 1], launch)
    assert tried == [2]  # straight to the remembered one
    tried.clear()
    triton_common.launch_fitting("op", [5, 1], launch)  # a ladder without the remembered config: from its top
    assert tried == [5, 1]
    with pytest.raises(RuntimeError, match="no tile config fits"):
        triton_common.launch_fitting("another op", [6, 5], launch)


class SmallGpu(RecordingKernel):
    """A Triton kernel as a GPU that holds only the launches `fits(options)` accepts; records what it ran."""

    def __init__(self, kernel, fits):
        super().__init__(kernel)
        self.fits = fits

    def __getitem__(self, grid):
        launch = super().__getitem__(grid)

        def fitting(*args, **options):
            if not self.fits(options):
                raise OutOfResources(200 * 1024, 99 * 1024, "shared memory")
            return launch(*args, **options)
        return fitting

    @property
    def ran(self):
        return [(options["BLOCK_H"], options["BLOCK_N"], options["num_stages"]) for options in self.options]

    @property
    def warps(self):
        return [options["num_warps"] for options in self.options]


@pytest.mark.parametrize("is_fp8", [False, True])
def test_sparse_decode_falls_back_to_tiles_the_gpu_holds(monkeypatch, is_fp8):
    # what sm_89 holds of the ladder (compiled): BF16 32 heads x 32 keys, FP8 64 x 32 with one stage
    fits = ((lambda o: o["BLOCK_H"] <= 32 and o["BLOCK_N"] <= 32) if not is_fp8 else
            (lambda o: o["BLOCK_N"] <= 32 and o["num_stages"] == 1))
    gpu = SmallGpu(triton_sparse._sparse_decode_split_kernel, fits)
    monkeypatch.setattr(triton_sparse, "_sparse_decode_split_kernel", gpu)
    run_decode(2, 2, 64, 130, 0, True, is_fp8)
    # one launch a run: the refused ones never ran
    assert gpu.ran == [(64, 32, 1) if is_fp8 else (32, 32, 2)] * POISONED_RUNS


def test_sparse_prefill_falls_back_to_tiles_the_gpu_holds(monkeypatch):
    gpu = SmallGpu(triton_sparse._sparse_prefill_kernel, lambda o: o["BLOCK_H"] <= 32 and o["BLOCK_N"] <= 32)
    monkeypatch.setattr(triton_sparse, "_sparse_prefill_kernel", gpu)
    run_prefill([6], 64, 64, 40, False, False)
    assert gpu.ran == [(32, 32, 2)] * POISONED_RUNS


SIXTY_FOUR_ROWS = triton_decode.LaunchConfig(block_h=64, block_n=32, num_warps=8, num_stages=2, programs_per_sm=1)


def test_dense_decode_falls_back_to_tiles_the_gpu_holds(monkeypatch):
    gpu = SmallGpu(triton_decode._dense_decode_split_kernel, lambda o: o["BLOCK_H"] <= 32)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", gpu)
    monkeypatch.setattr(triton_decode, "default_config", lambda batch, rows, device, is_fp8: SIXTY_FOUR_ROWS)
    run_and_compare([100, 65, 3], 1, 64, causal=True, is_fp8=False, sink=False)
    assert gpu.ran == [(32, 32, 2)] * POISONED_RUNS


def test_a_given_config_is_run_as_given(monkeypatch):
    """bench_decode.py --tune times the configs it names: none gives way to another."""
    gpu = SmallGpu(triton_decode._dense_decode_split_kernel, lambda o: o["BLOCK_H"] <= 32)
    monkeypatch.setattr(triton_decode, "_dense_decode_split_kernel", gpu)
    with pytest.raises(RuntimeError, match="no tile config fits"):
        run_and_compare([100, 65], 1, 64, causal=False, is_fp8=False, sink=False, config=SIXTY_FOUR_ROWS)


@pytest.mark.parametrize("op", ["decode", "prefill"])
def test_a_given_sparse_config_is_run_as_given(monkeypatch, op):
    """bench_sparse.py --tune times the tiles it names: those run (and compute the reference's result), and one the
    GPU refuses gives way to none."""
    kernel = "_sparse_decode_split_kernel" if op == "decode" else "_sparse_prefill_kernel"
    gpu = SmallGpu(getattr(triton_sparse, kernel), lambda o: o["BLOCK_H"] <= 16)
    monkeypatch.setattr(triton_sparse, kernel, gpu)
    function = getattr(triton_sparse, f"sparse_{op}")
    run = (lambda: run_decode(2, 2, 64, 130, 0, True, True)) if op == "decode" else (
        lambda: run_prefill([6], 64, 64, 40, False, False))
    given = triton_sparse.TileConfig(block_h=16, block_n=32, num_warps=2, num_stages=1)
    monkeypatch.setattr(triton_sparse, f"sparse_{op}", functools.partial(function, config=given))
    run()
    assert gpu.ran == [(16, 32, 1)] * POISONED_RUNS and gpu.warps == [2] * POISONED_RUNS
    refused = triton_sparse.TileConfig(block_h=64, block_n=64, num_warps=8, num_stages=2)
    monkeypatch.setattr(triton_sparse, f"sparse_{op}", functools.partial(function, config=refused))
    with pytest.raises(RuntimeError, match="no tile config fits"):
        run()
