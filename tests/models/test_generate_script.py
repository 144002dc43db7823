"""scripts/generate.py's command line on checkpoints written by transformers: `--greedy --dtype float32 --kv-cache
fp32` (the exact reference path) gives the tokens of transformers' own greedy `generate`.

Prompts are token ids (`--prompt-ids`: the tiny checkpoints have no tokenizer), longer than V3.2's index_topk (16),
batched, of different lengths, so that prefill and every decode step of V3.2 really select. V3.2's checkpoint is
conftest's `EXACT_V32` (no exact ties in the indexer's scores: see test_deepseek.py).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ([5, 17, 33, 2, 90, 41, 8, 8, 64, 12, 3, 77, 101, 56, 23, 9, 44, 120, 31, 6, 70, 15],
           [11, 99, 4, 28, 63, 50, 7, 19, 85, 36, 2, 47, 110, 25, 13, 58, 72, 30, 91])
MAX_NEW_TOKENS = 10


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate_script = load_script("generate")


@torch.no_grad()
def transformers_greedy(hf_model, prompt: list[int]) -> list[int]:
    """transformers' greedy tokens after `prompt` (its own cache), up to EOS (included) or MAX_NEW_TOKENS."""
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=hf_model.config.eos_token_id)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3", "deepseek_v32"])
def test_greedy_float32_matches_transformers(request, hf_checkpoints, model_type, capsys):
    path, hf_model = (request.getfixturevalue("exact_v32_checkpoint") if model_type == "deepseek_v32"
                      else hf_checkpoints(model_type))
    assert min(map(len, PROMPTS)) > hf_model.config.to_dict().get("index_topk", 0)
    prompt_args = [arg for prompt in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    outputs = generate_script.main(["--model", str(path), *prompt_args, "--greedy", "--dtype", "float32",
                                    "--kv-cache", "fp32", "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu"])
    expected = [transformers_greedy(hf_model, prompt) for prompt in PROMPTS]
    assert outputs == expected
    printed = capsys.readouterr().out
    assert f"{PROMPTS[0]} -> {expected[0]}" in printed and "fp32 cache" in printed
    # --samples: rows sharing each prompt's blocks (prefilled once); greedy, each row transformers' tokens
    outputs = generate_script.main(["--model", str(path), *prompt_args, "--samples", "2", "--greedy", "--dtype",
                                    "float32", "--kv-cache", "fp32", "--max-new-tokens", str(MAX_NEW_TOKENS),
                                    "--device", "cpu", "--warmup", "0"])
    assert outputs == [tokens for tokens in expected for _ in range(2)]


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v32"])
def test_a_second_turn_matches_transformers(request, hf_checkpoints, model_type, capsys):
    """`--then-ids`: every conversation continues on the same cache with the turn's tokens after its reply; the
    reply to it is transformers' greedy continuation of the whole conversation (prompt, first reply, turn)."""
    path, hf_model = (request.getfixturevalue("exact_v32_checkpoint") if model_type == "deepseek_v32"
                      else hf_checkpoints(model_type))
    turn = [40, 7, 88, 19, 3, 61, 25]
    prompt_args = [arg for prompt in PROMPTS for arg in ("--prompt-ids", ",".join(map(str, prompt)))]
    outputs = generate_script.main(["--model", str(path), *prompt_args, "--then-ids", ",".join(map(str, turn)),
                                    "--greedy", "--dtype", "float32", "--kv-cache", "fp32", "--max-new-tokens",
                                    str(MAX_NEW_TOKENS), "--device", "cpu"])
    first = [transformers_greedy(hf_model, prompt) for prompt in PROMPTS]
    expected = [transformers_greedy(hf_model, prompt + reply + turn) for prompt, reply in zip(PROMPTS, first)]
    assert outputs == expected
    printed = capsys.readouterr().out
    assert f"{PROMPTS[0]} -> {first[0]}" in printed and f"{turn} -> {expected[0]}" in printed


def test_arguments():
    parse = generate_script.parse_args
    args = parse(["--random-tiny", "v3", "--dtype", "fp32", "--prompt-ids", "1, 2,3", "--prompt-ids", "4"])
    assert args.dtype == "fp32" and generate_script.DTYPES[args.dtype] == torch.float32
    assert args.prompt_ids == [[1, 2, 3], [4]] and args.temperature == 0
    assert generate_script.DTYPES[parse(["--random-tiny", "v3"]).dtype] == torch.bfloat16  # the default
    assert generate_script.DTYPES[parse(["--random-tiny", "v3", "--dtype", "bfloat16"]).dtype] == torch.bfloat16
    for bad in (["--greedy", "--temperature", "0.7"], ["--prompt-ids", "1,x"], ["--prompt", "a", "--prompt-ids", "1"],
                ["--kv-cache", "fp16"], ["--dtype", "float16"],
                # what generate() refuses, said before the model loads
                ["--max-new-tokens", "0"], ["--temperature", "-1"], ["--temperature", "nan"], ["--top-p", "0"],
                ["--top-p", "1.5"], ["--tp", "0"], ["--then-ids", "1,-2"], ["--prompt-ids", "1", "--then", "a"],
                ["--prompt", "a", "--then-ids", "1"], ["--then", "a", "--then-ids", "1"], ["--samples", "0"],
                ["--device", "foo"], ["--seed", str(2 ** 64)], ["--seed", str(-2 ** 63 - 1)],
                ["--prompt", "a", "--then", ""]):
        with pytest.raises(SystemExit):
            parse(["--random-tiny", "v3", *bad])


def test_bad_setups_are_said_before_anything_loads(tmp_path, monkeypatch, capsys):
    """A checkpoint directory that is not one, --tp without torchrun, --device cuda without a GPU and negative ids
    end in a usage error naming them, not in a traceback from deep inside; ids past the vocabulary and a run past the
    model's positions are refused once the config is read, before the weights load."""
    parse = generate_script.parse_args
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad, said in ((["--model", str(tmp_path / "nothing")], "no config.json"),
                      (["--random-tiny", "v3", "--tp", "2"], "torchrun"),
                      (["--random-tiny", "v3", "--device", "cuda"], "no CUDA GPU"),
                      (["--random-tiny", "v3", "--prompt-ids", "3,-1"], ">= 0")):
        with pytest.raises(SystemExit):
            parse(bad)
        assert said in capsys.readouterr().err
    checkpoint = ROOT / "models" / "assets" / "deepseek-v32-tiny-kjv"
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args))
    with pytest.raises(SystemExit, match="vocab_size"):
        generate_script.main(["--model", str(checkpoint), "--prompt-ids", "5,4096", "--device", "cpu"])
    with pytest.raises(SystemExit, match="max_position_embeddings"):
        generate_script.main(["--model", str(checkpoint), "--prompt-ids", "5,6", "--max-new-tokens", "2000",
                              "--device", "cpu"])
    assert loads == []


def test_positions_count_the_cached_tokens_and_torchrun_needs_tp(monkeypatch, capsys):
    """A run fits when the tokens it caches do: the prompt and every new token but the last (returned, not cached),
    so prompt + max_new_tokens may pass max_position_embeddings by one (a review found 1000 + 25 refused at 1024).
    Under torchrun without --tp every process would run, and print, the whole model: a usage error."""
    checkpoint = ROOT / "models" / "assets" / "deepseek-v32-tiny-kjv"
    loads = []
    monkeypatch.setattr(generate_script, "load_model", lambda *args: loads.append(args) or (_ for _ in ()).throw(
        RuntimeError("loaded")))
    prompt = ",".join(["5"] * 1000)
    with pytest.raises(RuntimeError, match="loaded"):  # 1024 cached tokens: past the checks, to the weights
        generate_script.main(["--model", str(checkpoint), "--prompt-ids", prompt, "--max-new-tokens", "25",
                              "--device", "cpu"])
    with pytest.raises(SystemExit, match="1025 positions"):
        generate_script.main(["--model", str(checkpoint), "--prompt-ids", prompt, "--max-new-tokens", "26",
                              "--device", "cpu"])
    assert len(loads) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        generate_script.parse_args(["--random-tiny", "v3"])
    assert "--tp 2" in capsys.readouterr().err


def test_a_checkpoint_with_a_tokenizer_gets_the_sample_prompts(monkeypatch):
    """--model naming a checkpoint with tokenizer files, without --prompt, runs the sample prompts (as the default
    checkpoint does), not the fixed token ids meant for a model without a tokenizer."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    checkpoint = ROOT / "models" / "assets" / "deepseek-v32-tiny-kjv"
    named = generate_script.parse_args(["--model", str(checkpoint)])
    default = generate_script.parse_args([])
    assert named.prompt == default.prompt == list(generate_script.SAMPLE_PROMPTS)
    assert generate_script.parse_args(["--model", str(checkpoint), "--prompt-ids", "5,6"]).prompt is None


def test_sampling_flags_reach_generate(monkeypatch):
    """--temperature, --top-p and --seed (with --samples: rows sharing the prompt's blocks) draw the tokens that
    `generate` draws with those arguments and a generator seeded with --seed; the untimed warm-up (greedy) draws
    none of them. (Every other test of the command line is greedy: a run that sampled at temperature 0 passed.)"""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    from models import DeepseekConfig, PagedKVCache, generate, random_model, tiny_config

    seed, prompt = 7, [5, 17, 33, 2, 90]
    outputs = generate_script.main(["--random-tiny", "v3", "--prompt-ids", ",".join(map(str, prompt)), "--samples",
                                    "2", "--temperature", "1.5", "--top-p", "0.5", "--seed", str(seed),
                                    "--dtype", "float32", "--max-new-tokens", "12", "--device", "cpu"])
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3"))
    model = random_model(config, torch.float32, "cpu", seed=seed)
    want = {}
    for temperature, top_p in ((1.5, 0.5), (1.5, 1.0), (0.0, 1.0)):
        cache = PagedKVCache(config, num_blocks=2, max_batch_size=2, max_seq_len=64)
        want[temperature, top_p] = generate(model, cache, [prompt] * 2, 12, temperature, top_p,
                                            generator=torch.Generator().manual_seed(seed))[0]
    assert outputs == want[1.5, 0.5]
    # each flag matters here: the samples differ, and from those of the whole softmax and the greedy tokens
    assert outputs[0] != outputs[1] and outputs != want[1.5, 1.0] and outputs != want[0.0, 1.0]
