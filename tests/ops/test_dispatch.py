"""flashmla_ops/_ext.py: which path an op takes, FLASHMLA_BACKEND, and the build's failure and thread behaviour
(no GPU needed: the GPU, the build and the devices are faked where a test needs them)."""
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import flashmla_ops
from flashmla_ops import _ext

ops = torch.ops.flashmla


@pytest.fixture
def warnings_once(monkeypatch):
    """A fresh record of the once-per-op warnings."""
    monkeypatch.setattr(_ext, "_WARNED", set())


def test_an_empty_backend_variable_means_auto(monkeypatch):
    monkeypatch.setenv(_ext.BACKEND_ENV, "")
    assert _ext._forced() == "auto"
    monkeypatch.setenv(_ext.BACKEND_ENV, "Triton")
    with pytest.raises(ValueError, match="FLASHMLA_BACKEND must be one of"):
        _ext._forced()


def test_backend_names_only_the_ops():
    assert flashmla_ops.backend("dense_decode", "cpu") == "reference"
    assert flashmla_ops.backend("get_mla_metadata", "cpu") == "reference"
    for wrong in ("dense_decod", "flashmla::dense_decode"):
        with pytest.raises(ValueError, match=f"got {wrong!r}"):
            flashmla_ops.backend(wrong, "cpu")


def test_every_op_is_named_by_the_dispatch():
    """Every registered op is in KERNELS, so backend() answers for each."""
    registered = {name for name in dir(ops) if isinstance(getattr(ops, name), torch._ops.OpOverloadPacket)}
    assert registered == set(_ext.KERNELS)


def test_a_forced_path_on_cpu_tensors_says_it_runs_the_reference(monkeypatch, warnings_once, caplog):
    monkeypatch.setenv(_ext.BACKEND_ENV, "triton")
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        for _ in range(3):
            ops.quantize_kv_fp8(torch.randn(2, 576).bfloat16())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "FLASHMLA_BACKEND=triton but quantize_kv_fp8 runs the PyTorch reference: cpu" in said[0]


def test_a_forced_path_says_when_its_kernel_does_not_cover_the_inputs(monkeypatch, warnings_once, caplog):
    """On a GPU (only the device type is read here) an op that falls back to its reference under a forced path says
    so once, whatever the reason (no kernel built, or inputs the kernel does not cover)."""
    monkeypatch.setenv(_ext.BACKEND_ENV, "cuda")
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        _ext.reference_fallback("dense_decode", "cuda")
        _ext.reference_fallback("dense_decode", "cuda:0")
        _ext.reference_fallback("sparse_decode", "cpu")  # CPU: paths() says it
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "dense_decode runs the PyTorch reference: inputs its kernel does not cover" in said[0]
    monkeypatch.setenv(_ext.BACKEND_ENV, "auto")
    _ext.reference_fallback("sparse_decode", "cuda")
    assert len(caplog.records) == 1


def test_reference_runs_records_each_call_that_runs_a_reference(reference_runs):
    """flashmla_ops.reference_runs (the GPU tests' `reference_runs` fixture, sanitize_ops.py's check that every case
    ran a kernel): each op call that runs the op's reference, here three cache ops on CPU tensors, in order, in every
    open block; a block that has closed records nothing more."""
    kv = torch.randn(3, 576).bfloat16()
    with flashmla_ops.reference_runs() as inner:
        packed = ops.quantize_kv_fp8(kv)
        ops.dequantize_kv_fp8(packed)
    cache = torch.zeros(1, 64, 1, 576, dtype=torch.bfloat16)
    ops.write_kv_cache(cache, kv[:, :512], kv[:, 512:], torch.arange(3), False)
    assert inner == ["quantize_kv_fp8", "dequantize_kv_fp8"]
    assert reference_runs == ["quantize_kv_fp8", "dequantize_kv_fp8", "write_kv_cache"]
    assert not _ext._REFERENCE_RECORDS[1:]  # the fixture's block only


def test_reference_runs_blocks_open_and_close_on_many_threads():
    """Blocks opened and closed on several threads at once (a server's requests): finding a block and deleting it
    raced, an IndexError or "generator raised StopIteration" at a block's end, and other blocks left open."""
    switch_interval = sys.getswitchinterval()
    failures = []

    def requests():
        try:
            for _ in range(300):
                with flashmla_ops.reference_runs() as ran:
                    _ext.reference_fallback("dense_decode", "cpu")
                assert "dense_decode" in ran
        except Exception as error:  # noqa: BLE001 (reported by the assert below, with the thread's error)
            failures.append(repr(error))

    sys.setswitchinterval(1e-6)  # a thread switch between any two bytecodes, as under load
    try:
        threads = [threading.Thread(target=requests) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch_interval)
    assert failures == [] and _ext._REFERENCE_RECORDS == []


def test_a_forced_path_restricts_the_paths_on_a_gpu(monkeypatch, warnings_once, caplog):
    """On a Hopper GPU with the kernels built (faked), FLASHMLA_BACKEND keeps the one path it names; forced to CUDA
    where the kernels did not build, the op lists none and says so once."""
    monkeypatch.setattr(_ext, "_hopper", lambda device: True)
    monkeypatch.setattr(_ext, "_triton_importable", lambda: True)
    monkeypatch.setattr(_ext, "_load", lambda: object())
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        for forced, listed in (("auto", ("cuda", "triton")), ("cuda", ("cuda",)), ("triton", ("triton",)),
                               ("reference", ())):
            monkeypatch.setenv(_ext.BACKEND_ENV, forced)
            assert _ext.paths("sparse_decode", "cuda:0") == listed, forced
            assert _ext.paths("routed_experts", "cuda:0") == (() if forced in ("cuda", "reference") else ("triton",))
        monkeypatch.setattr(_ext, "_load", lambda: None)
        monkeypatch.setenv(_ext.BACKEND_ENV, "cuda")
        for _ in range(3):
            assert _ext.paths("dense_decode", "cuda:0") == ()
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        f"FLASHMLA_BACKEND=cuda but {op} runs the PyTorch reference: no usable kernel of that kind here"
        for op in ("routed_experts", "dense_decode")]


def test_a_build_that_does_not_load_falls_back_with_one_warning(monkeypatch, caplog):
    """cpp_extension.load raises ImportError when the library builds but cannot be loaded (an undefined symbol):
    one warning, then the Triton or reference path, as for a failed build."""
    import torch.utils.cpp_extension

    def undefined_symbol(**kwargs):
        raise ImportError("flashmla_ops_cuda.so: undefined symbol: _ZN8flashmla14sparse_prefill")

    monkeypatch.delenv(_ext.CSRC_ENV, raising=False)
    monkeypatch.setattr(_ext, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", undefined_symbol)
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        assert _ext._load.__wrapped__() is None
    assert len(caplog.records) == 1 and "undefined symbol" in caplog.records[0].getMessage()


def test_the_build_warning_quotes_the_error_not_the_first_command():
    ninja = RuntimeError("Error building extension 'flashmla_ops_cuda': [1/8] /usr/local/cuda/bin/nvcc -c "
                         "dense_decode.cu -o dense_decode.cuda.o\n[2/8] c++ -c bindings.cpp\nFAILED: x.so\n"
                         "/usr/bin/ld: cannot find -lc10_cuda: No such file or directory\n"
                         "collect2: error: ld returned 1 exit status\n")
    assert _ext.build_error(ninja) == "collect2: error: ld returned 1 exit status"
    assert _ext.build_error(OSError("no space left")) == "no space left"
    for cause in ("nvcc fatal   : Unsupported gpu architecture 'compute_90a'",
                  "/bin/sh: 1: /opt/cuda/bin/nvcc: not found"):
        failed = RuntimeError(f"Error building extension 'flashmla_ops_cuda': [1/8] /opt/cuda/bin/nvcc -c a.cu\n"
                              f"{cause}\nninja: build stopped: subcommand failed.")
        assert _ext.build_error(failed) == cause
    assert _ext.build_error(RuntimeError("")) == "RuntimeError"
    assert len(_ext.build_error(RuntimeError("error " + "x" * 1000))) == 300


def test_the_build_runs_once_across_threads():
    calls = []

    @_ext._once
    def slow_build():
        calls.append(threading.get_ident())
        time.sleep(0.05)
        return object()

    barrier = threading.Barrier(8)
    results = []

    def first_op_call():
        barrier.wait()
        results.append(slow_build())

    threads = [threading.Thread(target=first_op_call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and len({id(r) for r in results}) == 1
    slow_build.cache_clear()
    slow_build()
    assert len(calls) == 2


def test_the_cuda_path_asks_each_device_its_architecture(monkeypatch):
    """A process that sees an sm_90, an sm_80 and an sm_100 GPU (the kernels built, as the current device is the
    first): the csrc kernels (sm_90a code) are the path on the first only, and backend() names the best path listed."""
    caps = {0: (9, 0), 1: (8, 0), 2: (10, 0)}
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA torch's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps[torch.device(device).index or 0])
    monkeypatch.setattr(_ext, "_load", lambda: object())
    monkeypatch.setattr(_ext, "_triton_importable", lambda: True)
    monkeypatch.setenv(_ext.BACKEND_ENV, "auto")
    _ext._hopper.cache_clear()
    try:
        assert _ext.paths("dense_decode", "cuda:0") == ("cuda", "triton")
        assert _ext.paths("dense_decode", "cuda:1") == _ext.paths("dense_decode", "cuda:2") == ("triton",)
        assert [_ext.backend("dense_decode", f"cuda:{i}") for i in range(3)] == ["cuda", "triton", "triton"]
    finally:
        _ext._hopper.cache_clear()


def test_amd_gpus_take_triton_without_the_nvidia_rules(monkeypatch):
    """ROCm's torch names an AMD GPU a "cuda" device whose capability is its gfx version: an MI250 (gfx90a) reads
    (9, 0), as Hopper does. Its ops take Triton (the csrc kernels do not build without CUDA), and no rule keyed on an
    sm_XY applies: the kernels decode e4m3 with integer ops, and the 64-row tiles do not mask their logits apart (a
    workaround for wgmma, which AMD GPUs do not have)."""
    pytest.importorskip("triton")
    from flashmla_ops.triton import common, kv_cache

    device = torch.device("cuda:0")
    monkeypatch.setattr(torch.version, "hip", "6.4.0")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(_ext, "_load", _ext._load.__wrapped__)  # uncached: the process's own answer stays as it is
    monkeypatch.setattr(_ext, "_triton_importable", lambda: True)
    monkeypatch.setenv(_ext.BACKEND_ENV, "auto")
    for name in (_ext.CSRC_ENV, _ext.EXTRA_FLAGS_ENV):
        monkeypatch.delenv(name, raising=False)
    rules = (common.hardware_fp8, common.warpgroup_products)  # cached per device: cleared around each reading

    def cleared():
        for rule in rules:
            rule.cache_clear()

    cleared()
    try:
        assert _ext._unavailable_reason() == "this torch build has no CUDA"
        assert _ext.paths("dense_decode", device) == ("triton",)
        assert _ext.backend("sparse_prefill", device) == "triton"
        assert common.hardware_fp8(device) == common.FP8_INTEGER
        assert not kv_cache.hardware_e4m3_encode(device)
        assert not common.warpgroup_products(device)
        cleared()  # the same capability from a CUDA torch: Hopper's rules
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(torch.version, "cuda", "13.0")
        assert common.hardware_fp8(device) == common.FP8_HARDWARE and common.warpgroup_products(device)
    finally:
        cleared()


def test_the_kernels_read_the_interpreter_setting_as_triton_does():
    """TRITON_INTERPRET=true interprets (Triton's own reading); the kernels must then take their interpreter
    branches (bf16 products in float32), or the interpreter's bf16 dot gives wrong numbers."""
    pytest.importorskip("triton")
    for value, interpreting in (("true", True), ("1", True), ("0", False)):
        shown = subprocess.run([sys.executable, "-c", "from flashmla_ops.triton import common; print(common.INTERPRET)"],
                               env={**os.environ, "TRITON_INTERPRET": value}, capture_output=True, text=True,
                               check=True)
        assert shown.stdout.strip() == str(interpreting), (value, shown.stdout, shown.stderr)


def test_yes_no_variables_mean_what_they_say(monkeypatch):
    """FLASHMLA_CHECK=false turned the syncing checks on (anything but 0 did), FLASHMLA_VERBOSE_BUILD=true was
    ignored (only 1 counted): both take 1/0, true/false, yes/no, on/off in any case, and refuse anything else."""
    from flashmla_ops._checks import debug_checks, env_flag

    for value, meaning in (("false", False), ("0", False), ("", False), ("Off", False), ("no", False),
                           ("1", True), ("TRUE", True), ("yes", True), (" on ", True)):
        monkeypatch.setenv("FLASHMLA_CHECK", value)
        assert debug_checks() is meaning, value
        monkeypatch.setenv("FLASHMLA_VERBOSE_BUILD", value)
        assert env_flag("FLASHMLA_VERBOSE_BUILD") is meaning, value
    monkeypatch.setenv("FLASHMLA_CHECK", "sometimes")
    with pytest.raises(ValueError, match="FLASHMLA_CHECK must be 1 or 0"):
        debug_checks()
    monkeypatch.delenv("FLASHMLA_CHECK")
    assert debug_checks() is False


def test_sparse_decode_with_an_extra_cache_takes_the_first_path_listed(monkeypatch):
    """With or without an extra cache the CUDA kernel comes first (one extension call since stop 51, 1.4x faster than
    Triton's one pass on the H200; stops 49-50 sent extra caches to Triton first), then Triton; a path not listed
    (forced away) is not taken."""
    pytest.importorskip("triton")
    from flashmla_ops.decode import sparse_decode_path
    from flashmla_ops.kv_cache import D_QK

    q = torch.zeros(2, 1, 64, D_QK, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 1, D_QK, dtype=torch.bfloat16)
    for listed, extra, taken in ((("cuda", "triton"), cache, "cuda"), (("cuda", "triton"), None, "cuda"),
                                 (("cuda",), cache, "cuda"), (("triton",), cache, "triton"),
                                 (("triton", "reference"), None, "triton"), (("reference",), cache, "reference")):
        monkeypatch.setattr(_ext, "paths", lambda op, device: listed)
        assert sparse_decode_path(q, cache, extra, 512, False) == taken, (listed, extra is None)


def test_a_forced_reference_is_not_warned_about(monkeypatch, warnings_once, caplog):
    """FLASHMLA_BACKEND=reference asks for the reference: no path listed, on CPU or GPU tensors, and no warning that
    the op "runs the PyTorch reference" (that warning is for a forced kernel that does not run)."""
    monkeypatch.setenv(_ext.BACKEND_ENV, "reference")
    monkeypatch.setattr(_ext, "_load", lambda: object())
    monkeypatch.setattr(_ext, "_hopper", lambda device: True)
    monkeypatch.setattr(_ext, "_triton_importable", lambda: True)
    with caplog.at_level(logging.WARNING, logger="flashmla_ops"):
        assert _ext.paths("dense_decode", "cuda:0") == () and _ext.paths("dense_decode", "cpu") == ()
        ops.quantize_kv_fp8(torch.randn(2, 576).bfloat16())
    assert caplog.records == []


def test_batches_past_a_grids_second_dimension_take_the_triton_kernels(monkeypatch):
    """More than 65535 sequences (CUDA's limit on a grid's second dimension, where the Triton dense decode and paged
    indexer launch the batch) still take those kernels, which then launch the batch in the first (WIDE_BATCH), not the
    reference's loop over the sequences."""
    from flashmla_ops import decode, indexer

    monkeypatch.setattr(_ext, "paths", lambda op, device: ("triton",))
    k_cache = torch.empty(4, 64, 1, 576, dtype=torch.bfloat16, device="meta")
    index_cache = torch.empty(4, 64, 128, dtype=torch.bfloat16, device="meta")
    for batch in (65535, 65536):
        q = torch.empty(batch, 1, 16, 576, dtype=torch.bfloat16, device="meta")
        assert decode.dense_decode_path(q, k_cache, 512, False) == "triton"
        q = torch.empty(batch, 1, 64, 128, dtype=torch.bfloat16, device="meta")
        assert indexer.indexer_logits_paged_path(q, index_cache) == "triton"


@pytest.mark.parametrize("sparse", [False, True])
def test_decode_sends_an_fp8_cache_off_4_bytes_to_the_reference(monkeypatch, sparse):
    """An FP8 cache sliced from a byte buffer, its block and row strides 16-byte multiples: based on 16 bytes the CUDA
    kernel takes it, on 4 the Triton one, off 4 neither: the Triton kernels load each row's float32 scales as float32,
    a misaligned load a GPU faults on (they took such a cache where the CUDA kernel declined it). Sparse: as an extra
    cache too."""
    pytest.importorskip("triton")
    from flashmla_ops import decode

    monkeypatch.setattr(_ext, "paths", lambda op, device: ("cuda", "triton"))
    q = torch.zeros(1, 1, 16, 576, dtype=torch.bfloat16)
    buffer = torch.zeros(2 * 64 * 656 + 32, dtype=torch.uint8)
    base = (16 - buffer.data_ptr() % 16) % 16  # buffer[base:] starts on 16 bytes
    aligned = buffer[base:][:2 * 64 * 656].view(2, 64, 1, 656)
    for offset, path in ((0, "cuda"), (4, "triton"), (1, "reference"), (2, "reference")):
        cache = buffer[base + offset:][:2 * 64 * 656].view(2, 64, 1, 656)
        assert cache.stride()[:2] == (64 * 656, 656)
        if sparse:
            assert decode.sparse_decode_path(q, cache, None, 512, True) == path, offset
            assert decode.sparse_decode_path(q, aligned, cache, 512, True) == path, offset
        else:
            assert decode.dense_decode_path(q, cache, 512, True) == path, offset


def test_write_kv_cache_path_names_the_kernel_that_runs(monkeypatch):
    """The FP8 cache takes float32 rows too (models in float32): csrc/kv_cache.cu writes bfloat16 rows only, so those
    go to Triton, and `write_kv_cache_path` says so where `backend()` (the best path for the rows its kernels cover)
    says 'cuda'. Here on a faked Hopper GPU with the kernels built, the op run on CPU tensors."""
    pytest.importorskip("triton")
    from flashmla_ops import kv_cache
    from flashmla_ops.triton import kv_cache as triton_kv_cache

    ran = []

    class Extension:
        def write_kv_cache(self, *args):
            ran.append("cuda")

    monkeypatch.setattr(_ext, "paths", lambda op, device: ("cuda", "triton"))
    monkeypatch.setattr(_ext, "extension", lambda: Extension())
    monkeypatch.setattr(triton_kv_cache, "write_kv_cache", lambda *args: ran.append("triton"))
    cache = torch.zeros(2, 64, 1, 656, dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        latent, rope = torch.randn(3, 512, dtype=dtype), torch.randn(3, 64, dtype=dtype)
        ops.write_kv_cache(cache, latent, rope, torch.arange(3), True)
        assert kv_cache.write_kv_cache_path(cache, latent) == ran.pop(), dtype
    assert kv_cache.write_kv_cache_path(cache[:, :, :, 1:], latent) == "reference"  # rows 1 byte in: neither kernel


@pytest.mark.parametrize("triton_here, forced, named", [
    (True, "auto", "the Triton kernels, else the PyTorch reference"),
    (False, "auto", "the ops use the PyTorch reference"),
    (True, "cuda", "the PyTorch reference (FLASHMLA_BACKEND=cuda)")])
def test_a_failed_cuda_build_names_the_path_the_ops_take(monkeypatch, caplog, triton_here, forced, named):
    """Without triton (or with the CUDA path forced) the warning named the Triton kernels where the reference runs."""
    def failing_build():
        raise RuntimeError("nvcc failed")

    for name in (_ext.CSRC_ENV, _ext.EXTRA_FLAGS_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(_ext, "CSRC", _ext.PACKAGE_CSRC)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_unavailable_reason", lambda: None)
    monkeypatch.setattr(_ext, "build_extension", failing_build)
    monkeypatch.setattr(_ext, "_triton_importable", lambda: triton_here)
    monkeypatch.setenv(_ext.BACKEND_ENV, forced)
    with caplog.at_level("WARNING", logger=_ext.log.name):
        assert _ext._load.__wrapped__() is None
    assert named in caplog.text
    assert triton_here and forced == "auto" or "Triton" not in caplog.text
