"""The benchmarks' shared set-up (scripts/bench_decode.py), without a GPU: a forced backend the ops cannot take stops
the benchmark instead of timing the reference under its name, and output prefixes keep their dots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flashmla_ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))
import bench_decode  # noqa: E402
import bench_indexer  # noqa: E402
import bench_sparse  # noqa: E402


@pytest.fixture
def fake_h100(monkeypatch):
    """A GPU as far as bench_device asks (an H100: no ceilings measured); FLASHMLA_BACKEND restored afterwards."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setenv("FLASHMLA_BACKEND", os.environ.get("FLASHMLA_BACKEND", "auto"))


def test_a_forced_backend_the_ops_cannot_take_stops_the_benchmark(fake_h100, monkeypatch):
    monkeypatch.setattr(flashmla_ops, "backend", lambda op, device: "reference" if op == "sparse_prefill" else "cuda")
    with pytest.raises(SystemExit, match="--backend cuda, but here sparse_prefill runs reference"):
        bench_decode.bench_device("cuda", "bench_sparse.py", ("sparse_decode", "sparse_prefill"))
    assert bench_decode.bench_device("cuda", "bench_decode.py", ("dense_decode",)).type == "cuda"
    assert bench_decode.bench_device("auto", "bench_sparse.py", ("sparse_prefill",)).type == "cuda"  # not forced


def test_no_gpu_is_said(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="bench_decode.py needs a CUDA GPU"):
        bench_decode.bench_device("auto", "bench_decode.py", ("dense_decode",))


def test_an_output_prefix_keeps_its_dots(fake_h100, tmp_path):
    """`decode.h200` writes decode.h200.json, not decode.json (Path.with_suffix would replace `.h200`)."""
    written = []
    bench_decode.save_results(str(tmp_path / "decode.h200_tree_r1"), "cuda", [{"name": "x"}],
                              lambda rows, path: written.append(path))
    saved = json.loads((tmp_path / "decode.h200_tree_r1.json").read_text())
    assert saved["rows"] == [{"name": "x"}]
    assert written == [tmp_path / "decode.h200_tree_r1.png"]
    # what a reader needs to reproduce the figures: the command, the commit (this checkout's), the timer
    assert saved["meta"]["command"] and saved["meta"]["timer"] == bench_decode.TIMER
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(bench_decode.__file__).resolve().parent.parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git: _commit records none either
        head = None
    if head is not None and head.returncode == 0:  # a git checkout (CI's): the commit is recorded, not dropped
        assert saved["meta"]["commit"] is not None and saved["meta"]["commit"].split("+")[0] == head.stdout.strip()
    else:
        assert saved["meta"]["commit"] is None


@pytest.mark.parametrize("timer", ["graph", "events"])
def test_timer_argument_picks_the_timing(monkeypatch, timer):
    """`--timer events` times with SPEC.md §4's method (triton.testing.do_bench's median of single calls, rotating
    over the input sets) and rows record which timer made them; `graph` (the default) captures a CUDA graph."""
    import argparse

    import gpu_clock
    import triton.testing

    parser = argparse.ArgumentParser()
    bench_decode.add_timing_arguments(parser)
    assert parser.parse_args([]).timer == "graph"
    monkeypatch.setattr(bench_decode, "TIMER", "graph")
    monkeypatch.setattr(bench_decode, "SETTLE_S", 20.0)
    bench_decode.apply_timing_arguments(parser.parse_args(["--timer", timer, "--settle", "0"]))
    assert (bench_decode.TIMER, bench_decode.SETTLE_S) == (timer, 0.0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(gpu_clock, "read", lambda: None)
    monkeypatch.setattr(gpu_clock, "row_fields", lambda reading, settled_s: {"sm_clock_mhz": 1980, "slowdowns": []})
    seen = []

    def do_bench(fn, warmup, rep, return_mode):
        assert return_mode == "median"
        for _ in range(5):
            fn()
        return 0.25

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    if timer == "graph":
        def no_graph():
            raise RuntimeError("captured a CUDA graph")

        monkeypatch.setattr(torch.cuda, "CUDAGraph", no_graph)
        with pytest.raises(RuntimeError, match="captured a CUDA graph"):
            bench_decode.time_ms(seen.append, [(1,), (2,)])
        assert seen == [1]  # the warm-up only: no do_bench
        return
    assert bench_decode.time_ms(seen.append, [(1,), (2,)]) == 0.25
    assert seen == [1, 1, 2, 1, 2, 1]  # the warm-up, then the calls rotating over the sets
    assert bench_decode.LAST_CLOCK["timer"] == "events"
    assert bench_decode.clock_note(dict(bench_decode.LAST_CLOCK)).endswith("(events)")


def test_the_roofline_bends_at_the_ridge():
    """The decode plot's roofline has its corner where bandwidth x intensity reaches the compute peak (two end points
    alone drew a straight line far under the roof between them)."""
    xs, ys = bench_decode.roofline([15.0, 865.0])
    ridge = bench_decode.CEILINGS["bf16"] / bench_decode.CEILINGS["bandwidth"]
    assert xs[0] < ridge < xs[-1] and ridge in xs
    assert ys[xs.index(ridge)] == pytest.approx(bench_decode.CEILINGS["bf16"] / 1e12)
    assert ys[0] == pytest.approx(bench_decode.CEILINGS["bandwidth"] * xs[0] / 1e12)
    assert ys[-1] == ys[xs.index(ridge)]


def test_replot_draws_an_earlier_run_against_its_ceilings(tmp_path, monkeypatch):
    """`bench_decode.py --replot JSON` draws the PNG again from the saved rows, against the ceilings the run recorded:
    the roofline's ridge where that GPU's compute roof meets its bandwidth roof (stops before 48 drew it without)."""
    drawn = []
    monkeypatch.setattr(bench_decode, "plot", lambda rows, path: drawn.append((rows, path,
                                                                               bench_decode.roofline([10.0, 1000.0]))))
    monkeypatch.setattr(bench_decode, "CEILINGS", dict(bench_decode.CEILINGS))
    rows = [{"tflop_s": 100.0, "gb_s": 3000.0, "kv_cache": "bf16"}]
    ceilings = {"gpu": "NVIDIA H200 (measured)", "bandwidth": 4.0e12, "bf16": 700e12}
    (tmp_path / "decode.json").write_text(json.dumps({"meta": {"ceilings": ceilings}, "rows": rows}))
    bench_decode.replot(tmp_path / "decode.json")
    (got_rows, path, (xs, ys)), = drawn
    assert got_rows == rows and path == tmp_path / "decode.png"
    assert xs[1] == 700e12 / 4.0e12 and ys[1] == ys[2] == 700.0 and ys[0] == 4.0e12 * xs[0] / 1e12


def test_the_sanitizer_cases_run_and_report_a_wrong_output(monkeypatch, capsys):
    """scripts/sanitize_ops.py (run under compute-sanitizer on the GPU) on the CPU's reference path: its cases build
    valid inputs for the ops they call, and an op whose output is wrong makes it say so and exit 1."""
    import sanitize_ops
    monkeypatch.setattr(sys, "argv", ["sanitize_ops.py", "--device", "cpu", "--only", "h100"])
    monkeypatch.setenv("FLASHMLA_BACKEND", os.environ.get("FLASHMLA_BACKEND", "auto"))  # main sets it
    assert sanitize_ops.main() == 0
    assert "0 case(s) failed" in capsys.readouterr().out
    decode = flashmla_ops.flash_mla_with_kvcache
    monkeypatch.setattr(flashmla_ops, "flash_mla_with_kvcache", lambda *a, **k: (decode(*a, **k)[0] * 1.1,
                                                                                 decode(*a, **k)[1]))
    monkeypatch.setattr(sys, "argv", ["sanitize_ops.py", "--device", "cpu", "--only", "dense bf16 s_q1 h100"])
    assert sanitize_ops.main() == 1
    assert "output off by" in capsys.readouterr().out


# The SPEC.md §4 counts and the rows the scripts write.
D_QK, D_V, FP8_ROW = 576, 512, 656


def test_the_counts_are_spec_section_4s():
    """Decode FLOPs 2 b s_q h_q L (d_qk + d_v); bytes L x 576 x 2 (BF16) or x 656 (FP8) per sequence and KV head, plus
    q and out; sparse 2 queries h_q topk (d_qk + d_v); indexer logits 2 s_q h_i keys d_i, float32 logits written."""
    assert bench_decode.decode_flops(3, 2, 16, 4096) == 2 * 3 * 2 * 16 * 4096 * (D_QK + D_V)
    for fp8, row in ((False, D_QK * 2), (True, FP8_ROW)):
        assert bench_decode.decode_bytes(3, 2, 16, 4096, fp8) == 3 * 4096 * row + 3 * 2 * 16 * (D_QK + D_V) * 2
    assert bench_sparse.attention_flops(6, 64, 2048) == 2 * 6 * 64 * 2048 * (D_QK + D_V)
    _, args, flops, total, read = bench_indexer._one_set("logits", 4, 256, 2, 32, False, "cpu")
    assert flops == 2 * 4 * 2 * 256 * 32
    assert read == (4 * 2 * 32 + 256 * 32) * 2 and total == read + 4 * 2 * 4 + 4 * 256 * 4
    # FP8: e4m3 values plus the float32 per-row scales the kernels read with them (q per head, k per key; the paged
    # cache's rows hold theirs: d_i + 4 bytes a key)
    _, _, flops, total, read = bench_indexer._one_set("logits", 4, 256, 2, 32, True, "cpu")
    assert flops == 2 * 4 * 2 * 256 * 32 and read == 4 * 2 * (32 + 4) + 256 * (32 + 4)
    assert total == read + 4 * 2 * 4 + 4 * 256 * 4
    _, _, flops, total, read = bench_indexer._one_set("paged", 3, 128, 2, 32, True, "cpu")
    assert flops == 2 * 3 * 2 * 128 * 32 and read == 3 * 2 * (32 + 4) + 3 * 128 * (32 + 4)
    assert total == read + 3 * 2 * 4 + 3 * 128 * 4


def test_rows_report_rates_and_fractions_of_the_ceilings(monkeypatch):
    """bench_config's rows on the CPU (time_ms faked at 2 ms): GB/s and TFLOP/s from the counts, fractions of
    CEILINGS' bandwidth and BF16 rates; sparse decode counts batch x s_q queries, each gathering topk 656-byte rows."""
    monkeypatch.setattr(bench_decode, "time_ms", lambda fn, sets: 2.0)
    monkeypatch.setattr(bench_sparse, "time_ms", lambda fn, sets: 2.0)
    monkeypatch.setattr(bench_sparse, "DECODE_CONTEXT", 128)
    row = bench_decode.bench_config(2, 1, 16, [100, 100], False, "cpu", with_baselines=False)
    flops, nbytes = 2 * 2 * 16 * 100 * (D_QK + D_V), 2 * 100 * D_QK * 2 + 2 * 16 * (D_QK + D_V) * 2
    assert row["tflop_s"] == pytest.approx(flops / 2e-3 / 1e12) and row["gb_s"] == pytest.approx(nbytes / 2e-3 / 1e9)
    assert row["bandwidth_fraction"] == pytest.approx(nbytes / 2e-3 / bench_decode.CEILINGS["bandwidth"])
    assert row["compute_fraction"] == pytest.approx(flops / 2e-3 / bench_decode.CEILINGS["bf16"])
    # s_q 2 (both queries count, each over the whole sequence: SPEC's L_eff is seqlen), an FP8 cache, and lengths
    # that differ (each sequence counted at its own length, not the mean's or the longest's)
    row = bench_decode.bench_config(2, 2, 16, [100, 31], True, "cpu", with_baselines=False)
    flops = sum(2 * 2 * 16 * length * (D_QK + D_V) for length in (100, 31))
    nbytes = sum(length * FP8_ROW + 2 * 16 * (D_QK + D_V) * 2 for length in (100, 31))
    assert row["tflop_s"] == pytest.approx(flops / 2e-3 / 1e12) and row["gb_s"] == pytest.approx(nbytes / 2e-3 / 1e9)
    assert (row["kv_cache"], row["skewed"], row["seqlen"]) == ("fp8", True, 65)
    row = bench_sparse.bench_config("decode", 2, 2, 16, 32, True, "cpu", with_reference=False)
    queries = 2 * 2
    assert row["tflop_s"] == pytest.approx(2 * queries * 16 * 32 * (D_QK + D_V) / 2e-3 / 1e12)
    assert row["gb_s"] == pytest.approx((queries * 32 * FP8_ROW + queries * 16 * (D_QK + D_V) * 2) / 2e-3 / 1e9)
    # sparse prefill: size = s_q queries (not s_kv), each gathering topk BF16 rows of the packed kv
    row = bench_sparse.bench_config("prefill", 8, 64, 16, 32, False, "cpu", with_reference=False)
    assert row["tflop_s"] == pytest.approx(2 * 8 * 16 * 32 * (D_QK + D_V) / 2e-3 / 1e12)
    assert row["gb_s"] == pytest.approx((8 * 32 * D_QK * 2 + 8 * 16 * (D_QK + D_V) * 2) / 2e-3 / 1e9)


def test_rows_with_two_queries_are_causal():
    """SPEC.md §5's s_q 2 row is speculative decoding: bench_decode's op is causal from 2 queries on (query i sees
    `[0, L - s_q + i]`, SPEC.md §2), not one that lets both queries see the whole cache."""
    sets, cache_seqlens = bench_decode.make_inputs(2, 2, 4, [70, 100], False, "cpu", copies=1)
    q, cache, block_table = sets[0]
    got, _ = bench_decode.decode_op(cache_seqlens, 2, False)(q, cache, block_table)
    for causal in (True, False):
        want, _ = torch.ops.flashmla.dense_decode(q, cache, block_table, cache_seqlens, None, None, D_V, D_QK ** -0.5,
                                                  causal, False, None)
        assert torch.equal(got, want) == causal


def fake_rows(monkeypatch, module, bench_name, argv, rate, time_us=lambda *args: 100.0):
    """`module.main(argv)` on the CPU with `bench_name` faked to rows of `rate` GB/s and a tenth of it in TFLOP/s,
    taking `time_us(*its arguments)`; the saved rows."""
    saved = {}
    monkeypatch.setattr(module, "bench_device", lambda *a: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(module, bench_name, lambda *a, **k: {"time_us": time_us(*a), "gb_s": rate,
                                                             "tflop_s": rate / 10, "bandwidth_fraction": 0.0,
                                                             "compute_fraction": 0.0, "path": "reference"})
    monkeypatch.setattr(module, "save_results", lambda out, backend, rows, plot, **extra: saved.update(rows=rows))
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    module.main()
    return {row["name"]: row for row in saved["rows"]}


def test_rows_option_and_vs_target(monkeypatch):
    """--rows picks the rows whose name has any of its substrings; vs_target is achieved / target (decode: in the
    target's unit; the FP8 row: tokens/s over the BF16 row of its shape; sparse: TFLOP/s; indexer FP8 logits: of 60%
    of 1250 TFLOP/s); a --rows that picks nothing stops the script."""
    rows = fake_rows(monkeypatch, bench_decode, "bench_config", ["--rows", "b1 h128,bf16 b128 h16 16k"], 1000.0)
    assert set(rows) == {"bf16 b1 h128 32k", "bf16 b128 h16 16k"}
    assert rows["bf16 b1 h128 32k"]["vs_target"] == pytest.approx(1000 / 2000)
    rows = fake_rows(monkeypatch, bench_decode, "bench_config", ["--rows", "h16 16k", "--no-baselines"], 1000.0)
    assert rows["fp8 b128 h16 16k"]["vs_target"] == pytest.approx(1 / 1.6)  # same time as its BF16 row
    # the FP8 row 2.5x as fast as its BF16 row: 2.5 / 1.6 of the target (a ratio of 1 read the same either way up)
    rows = fake_rows(monkeypatch, bench_decode, "bench_config", ["--rows", "h16", "--no-baselines"], 1000.0,
                     time_us=lambda batch, s_q, h_q, seqlens, is_fp8, *rest: 400.0 if is_fp8 else 1000.0 + seqlens[0])
    fp8, bf16 = rows["fp8 b128 h16 16k"], rows["bf16 b128 h16 16k"]  # not h16 4k's: another shape, another time
    assert bf16["tokens_per_s"] == pytest.approx(128 / (1000.0 + 16384) / 1e-6)
    assert fp8["bf16_tokens_per_s"] == bf16["tokens_per_s"] and fp8["tokens_per_s"] == pytest.approx(128 / 400e-6)
    assert fp8["vs_target"] == pytest.approx((1000.0 + 16384) / 400.0 / 1.6)
    # rows whose target is in TFLOP/s are graded in TFLOP/s (a tenth of the GB/s here)
    rows = fake_rows(monkeypatch, bench_decode, "bench_config", ["--rows", "h128 4k"], 1000.0)
    assert rows["bf16 b128 h128 4k"]["vs_target"] == pytest.approx(100 / 600)
    assert rows["bf16 b128 s_q2 h128 4k"]["vs_target"] == pytest.approx(100 / 640)
    rows = fake_rows(monkeypatch, bench_sparse, "bench_config", ["--rows", "b64"], 1250.0)
    assert rows["decode fp8 b64 h64 topk2048"]["vs_target"] == pytest.approx(125 / 250)
    rows = fake_rows(monkeypatch, bench_indexer, "bench_row", ["--rows", "logits fp8 s_q"], 3750.0)
    assert rows["logits fp8 s_q4096 h64 s_kv32k"]["vs_target"] == pytest.approx(0.5)
    rows = fake_rows(monkeypatch, bench_indexer, "bench_row", [], 3750.0)  # the target is the FP8 prefill row's only
    assert {name for name, row in rows.items() if "vs_target" in row or "target" in row} == {
        "logits fp8 s_q4096 h64 s_kv32k"}
    for module, name in ((bench_decode, "bench_config"), (bench_sparse, "bench_config"), (bench_indexer, "bench_row")):
        with pytest.raises(SystemExit, match="no row's name has one of --rows"):
            fake_rows(monkeypatch, module, name, ["--rows", "no such row"], 1.0)


# SPEC.md §5's table, written out: (batch, s_q, h_q, seqlen, FP8 cache) -> (FlashMLA's figure, target)
SPEC_DENSE = {(128, 1, 16, 4096, False): ("2631 GB/s", (2750, "GB/s")),
              (128, 1, 16, 16384, False): ("2838 GB/s", (2850, "GB/s")),
              (128, 1, 128, 4096, False): ("557 TFLOP/s", (600, "TFLOP/s")),
              (128, 2, 128, 4096, False): ("609 TFLOP/s", (640, "TFLOP/s")),
              (1, 1, 128, 32768, False): ("803 GB/s", (2000, "GB/s")),
              (8, 1, 16, 32768, False): ("2353 GB/s", (2700, "GB/s")),
              (128, 1, 16, 16384, True): ("-", (1.6, "x bf16 tokens/s"))}
# (op, batch or s_q, s_q or s_kv, h_q, topk) -> (FlashMLA's figure, target TFLOP/s)
SPEC_SPARSE = {("decode", 128, 1, 128, 2048): ("379 TFLOP/s", 400), ("decode", 128, 2, 128, 2048): ("390 TFLOP/s", 410),
               ("decode", 64, 1, 64, 2048): ("212 TFLOP/s", 250),
               ("prefill", 4096, 32768, 128, 2048): ("583 TFLOP/s", 600),
               ("prefill", 4096, 32768, 64, 2048): ("556 TFLOP/s", 580)}


def test_the_rows_are_spec_section_5s():
    """Each script's SPEC rows have SPEC.md §5's shapes, FlashMLA figures and targets, and names that say so (the
    fakes above time no row, so a shape or target could change unseen)."""
    dense = {row[1:6]: row[6:] for row in bench_decode.SPEC_ROWS}
    assert dense == SPEC_DENSE and len(bench_decode.SPEC_ROWS) == len(SPEC_DENSE)
    for name, batch, s_q, h_q, seqlen, is_fp8, _, _ in bench_decode.SPEC_ROWS:
        words = set(name.split())
        assert {"fp8" if is_fp8 else "bf16", f"b{batch}", f"h{h_q}", f"{seqlen // 1024}k"} <= words
        assert (f"s_q{s_q}" in words) == (s_q > 1)
    sparse = {row[1:6]: row[6:] for row in bench_sparse.SPEC_ROWS}
    assert sparse == SPEC_SPARSE and len(bench_sparse.SPEC_ROWS) == len(SPEC_SPARSE)
    for name, op, size, second, h_q, topk, _, _ in bench_sparse.SPEC_ROWS:
        words = set(name.split())
        assert {op, f"h{h_q}"} <= words and ({"fp8", f"b{size}", f"topk{topk}"} if op == "decode" else
                                             {"bf16", f"s_q{size}", f"s_kv{second // 1024}k"}) <= words
    # indexer logits, FP8: s_q 4096, h_i 64, d_i 128, s_kv 32768, at >= 60% of the 1250 TFLOP/s FP8 matmul
    assert ("logits fp8 s_q4096 h64 s_kv32k", "logits", 4096, 32768, 64, 128, True) in bench_indexer.ROWS
    assert bench_indexer.TARGET_FRACTION * bench_indexer.PEAK_FP8 == pytest.approx(750e12)


def test_the_json_records_the_ceilings(fake_h100, tmp_path):
    """--replot draws against the ceilings the run recorded: save_results must record them."""
    bench_decode.save_results(str(tmp_path / "d"), "cuda", [], lambda rows, path: None)
    assert json.loads((tmp_path / "d.json").read_text())["meta"]["ceilings"] == bench_decode.CEILINGS


def test_backend_reference_is_not_captured_in_a_cuda_graph(monkeypatch):
    """The reference dense decode reads cache_seqlens on the host (`.tolist()`), which a CUDA graph capture refuses:
    `--backend reference` under the default `--timer graph` crashed at its first row. It times with events."""
    monkeypatch.setattr(bench_decode, "TIMER", "graph")
    monkeypatch.setattr(bench_decode, "SETTLE_S", bench_decode.SETTLE_S)
    timers = []
    monkeypatch.setattr(bench_decode, "bench_device", lambda *a: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(bench_decode, "bench_config", lambda *a, **k: timers.append(bench_decode.TIMER) or {
        "time_us": 100.0, "gb_s": 1.0, "tflop_s": 1.0, "bandwidth_fraction": 0.0, "compute_fraction": 0.0})
    monkeypatch.setattr(bench_decode, "save_results", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--backend", "reference", "--rows", "b1 h128"])
    bench_decode.main()
    assert timers == ["events"]
