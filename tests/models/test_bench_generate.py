"""scripts/bench_generate.py on the tiny preset on CPU, all four backends, in float32 with the exact fp32 cache:
it writes the JSON it promises, and the backends agree token by token, both where the whole context is prefilled
(40 tokens) and where most of it is random cache content written straight into each backend's cache (100 tokens, 40
prefilled), which checks that the two caches are filled with the same content."""
import json

import pytest
from test_generate_script import load_script  # tests/models is on sys.path (pytest's rootdir import mode)

bench_generate = load_script("bench_generate")
ROW_FIELDS = {"backend", "batch", "context", "kv_cache", "status", "prefill_tokens", "prefill_seconds",
              "prefill_tokens_per_s", "tpot_ms", "decode_tokens_per_s", "kv_bytes_per_token", "tokens"}
BATCH, STEPS, WARMUP = 2, 3, 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "generate"
    result = bench_generate.main(["--model-preset", "tiny", "--device", "cpu", "--batch", str(BATCH),
                                  "--context", "40,100", "--prefill-tokens", "80", "--steps", str(STEPS),
                                  "--warmup", str(WARMUP), "--dtype", "float32", "--kv-cache", "fp32",
                                  "--backends", ",".join(bench_generate.BACKENDS), "--out", str(out)])
    assert json.loads(out.with_suffix(".json").read_text()) == result
    assert out.with_suffix(".png").stat().st_size > 0
    return result


def tokens(result, backend: str, context: int) -> list[list[int]]:
    [row] = [r for r in result["rows"] if r["backend"] == backend and r["context"] == context]
    return row["tokens"]


def test_json_rows(result):
    rows = result["rows"]
    assert {(r["backend"], r["context"]) for r in rows} == {(b, c) for b in bench_generate.BACKENDS for c in (40, 100)}
    for row in rows:
        assert row["status"] == "ok", row
        assert ROW_FIELDS <= set(row)
        assert row["decode_tokens_per_s"] > 0 and row["tpot_ms"] > 0 and row["prefill_tokens_per_s"] > 0
        # 40 prefilled tokens per sequence at most; the 100-token context is filled with random latents past them
        assert row["prefill_tokens"] == BATCH * 40
        assert len(row["tokens"]) == BATCH and all(len(t) == 1 + WARMUP + STEPS for t in row["tokens"])
    # 2 layers of 512 + 64 float32 values per token, in both projects' caches (transformers keeps the latent too,
    # or more where a version caches expanded heads)
    assert all(r["kv_bytes_per_token"] == 2 * 576 * 4 for r in rows if r["backend"].startswith("ours"))
    assert all(r["kv_bytes_per_token"] >= 2 * 576 * 4 for r in rows)
    assert result["meta"]["preset"] == "tiny" and result["meta"]["config"]["num_hidden_layers"] == 2


@pytest.mark.parametrize("context", [40, 100])
def test_backends_agree(result, context):
    ours = tokens(result, "ours-eager", context)
    assert tokens(result, "ours-compiled", context) == ours
    assert tokens(result, "hf-eager", context) == ours


def test_backends_agree_v2_random_context(tmp_path):
    """DeepSeek-V2's RoPE: transformers caches the roped key's pairs adjacent, this project regrouped into halves;
    the random context past the 40 prefilled tokens must reach each cache in its own order."""
    result = bench_generate.main(["--model-preset", "tiny-v2", "--device", "cpu", "--batch", str(BATCH),
                                  "--context", "100", "--prefill-tokens", "80", "--steps", str(STEPS),
                                  "--warmup", "0", "--dtype", "float32", "--kv-cache", "fp32",
                                  "--backends", "ours-eager,hf-eager", "--out", str(tmp_path / "generate")])
    assert tokens(result, "hf-eager", 100) == tokens(result, "ours-eager", 100)


def test_arguments():
    args = bench_generate.parse_args(["--batch", "1,8", "--context", "1024", "--backends", "ours-eager, hf-eager"])
    assert args.batch == [1, 8] and args.context == [1024] and args.backends == ["ours-eager", "hf-eager"]
    assert bench_generate.model_config(bench_generate.parse_args(["--model-preset", "v2-lite"]))[
        "num_hidden_layers"] == 27
    assert bench_generate.model_config(bench_generate.parse_args(["--model-preset", "v3-layers", "--layers", "3"]))[
        "num_hidden_layers"] == 3
    for bad in (["--backends", "vllm"], ["--batch", "0"], ["--batch", ""], ["--context", "-5"], ["--steps", "0"],
                ["--warmup", "-1"], ["--prefill-tokens", "0"], ["--layers", "0"], ["--profile", "16", "--batch", "1"]):
        with pytest.raises(SystemExit):
            bench_generate.parse_args(bad)
    assert bench_generate.parse_args(["--profile", "4", "--batch", "1,4"]).profile == 4


@pytest.mark.parametrize("names, group", [
    (["flashmla::dense_decode", "self_attn"], "attention kernels"),
    # kernels replayed from a compiled step's CUDA graph: no enclosing op or module, only the kernel's own name
    (["void flashmla::decode::(anonymous namespace)::narrow_decode_kernel<true>(flashmla::decode::DecodeParams)"],
     "attention kernels"),
    (["void flashmla::(anonymous namespace)::combine_kernel(float const*, float const*)"], "attention kernels"),
    (["cudnn_generated_fort_native_sdpa_sm80_flash_fprop", "aten::_scaled_dot_product_cudnn_attention"],
     "attention kernels"),
    (["aten::mm", "self_attn"], "attention other"),
    (["aten::_grouped_mm", "moe"], "moe"),
    # the routed_experts op's kernels (batch 1) are MoE, though the op is a flashmla one; the cache writes are not
    # attention kernels
    (["_gate_up_kernel", "flashmla::routed_experts", "moe"], "moe"),
    (["_down_kernel", "flashmla::routed_experts"], "moe"),
    (["flashmla::write_kv_cache", "self_attn"], "attention other"),
    (["void flashmla::(anonymous namespace)::write_kv_cache_kernel(unsigned char*)"], "other"),
    (["void cutlass::device_kernel<at::cuda::detail::enable_sm90_or_later<...>>"], "other"),
    (["triton_poi_fused_add_mul_0"], "other"),
])
def test_profile_groups(names, group):
    assert bench_generate.step_group(names) == group
