"""The benchmarks' shared set-up (scripts/bench_decode.py), without a GPU: a forced backend the ops cannot take stops
the benchmark instead of timing the reference under its name, and output prefixes keep their dots."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import flashmla_ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent / "scripts"))
import bench_decode  # noqa: E402


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
    assert json.loads((tmp_path / "decode.h200_tree_r1.json").read_text())["rows"] == [{"name": "x"}]
    assert written == [tmp_path / "decode.h200_tree_r1.png"]
