"""models/parallel.py: tensor- and expert-parallel DeepSeek over gloo (2 and 4 CPU processes) and, marked `gpu`,
over NCCL (2 GPUs), against one process.

Each checkpoint is written by transformers (tests/models/conftest.py), loaded by every rank (only its parts) in
float32, and run through the same steps as in one process: a packed prefill of prompts of different lengths (every
token's logits), greedy decode steps of one token per sequence, and one of two. Per world size, one
`torch.multiprocessing.spawn` runs every configuration in turn; each rank saves its tokens and logits, which the
tests compare with the one-process run's. The tokens must be the same, on every rank; the logits of all ranks must be
identical (all-gathered), and close to one process's:
- V2/V3 prefill runs in float32 throughout (expanded attention): the ranks' partial sums, all-reduced, only add in
  another order than one matmul does. 1e-5 relative (5e-7 seen).
- Decode, and V3.2's absorbed prefill, hand the attention ops bfloat16 queries and latents: a last-bit float32
  difference in an input now and then rounds an element to the neighbouring bfloat16 (2^-8 relative), and the ops'
  float32 matmuls over fewer heads may sum in another order. That is one process's own noise floor: multiplying its
  weights by 1 + 2^-24 noise moves its V3 decode logits by 2e-4 to 7e-4. 2e-3 relative (up to 1e-3 seen); a
  wrong split, offset or missing reduction moves them by far more (and the greedy tokens with them).

Configurations: V2 (q_proj, no q_lora_rank), V3 (YaRN, vocabulary 128) and V3.2 (indexer replicated, vocabulary 127:
padded to 128 rows, the last rank's last row(s) empty), each with experts split by intermediate dimension (ep 1) and
partitioned (ep = tp); V3 from an FP8 block-quantized checkpoint in 3 files (weights and scales in different files;
ranks' rows of q_b_proj / o_proj cut inside 128-blocks); V3 in bfloat16 with experts partitioned (2 ranks: the
dtype the ops run in on GPUs, against one bfloat16 process). The compiled decode step (torch.compile fullgraph=True, the
collectives inside the graph) must generate the same tokens as the eager one.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_loading import fp8_checkpoint, quantize_fp8_blocks, write_checkpoint

from models import PagedKVCache, compile_decode_step, decode_step, generate, load_model, prefill
from models.deepseek import DeepseekConfig, Router
from models.loading import SINGLE_FILE, _read, build_model, random_model, tiny_config
from models.parallel import Parallel, Split, end_job, init_parallel

PROMPT_LENGTHS = (19, 6, 11)  # V3.2 (index_topk 16): the longest prompt attends to a real top-k choice
DECODE_STEPS = 3
FP32_TOL, BF16_TOL = 1e-5, 2e-3
# A bfloat16 model (jobs in BF16_JOBS; the ops' path on GPUs): every layer's activations round to bfloat16, and each
# rank's partial sums round before the all-reduce where one process rounds the whole sum. Measured on the CPU
# against one bfloat16 process: 0.6e-2 to 1.2e-2 relative (V2, V3 and V3.2, tp and ep; one bfloat16 process is itself
# 1e-2 to 6e-2 from float32). A missing reduction or a wrong split moves the logits by O(1); this catches those and
# whatever breaks only in bfloat16 (a collective or a buffer of the wrong dtype), not last-bit differences.
BF16_MODEL_TOL = 3e-2
# bfloat16 activations move the router's scores between one process and tp by far more than float32's 1.6e-4: the
# reference's expert choices must win by more (the V3 checkpoint's smallest bfloat16 margin is 5.2e-3).
BF16_MODEL_MARGIN = 4e-3
# The reference's expert choices must win by this much (router score gap, see `routing_margin`): bfloat16 decode
# noise moves V3's router scores between one process and tp by up to 1.6e-4, and a choice that flips moves the
# logits by far more than BF16_TOL (prompt seed 5 had a 5e-5 tie: 4.6e-2, on AVX-512 CPUs only).
MIN_ROUTING_MARGIN = 1e-3
# (name, checkpoint (see `checkpoints`), expert parallel: ep = tp, else ep 1) per world size
JOBS = {
    2: [("v2-ep", "v2", True), ("v3", "v3", False), ("v3-ep", "v3", True), ("v32", "v32", False),
        ("v32-ep", "v32", True), ("v3-fp8-ep", "v3-fp8", True), ("v3-bf16-ep", "v3", True)],
    4: [("v3-ep", "v3", True), ("v32", "v32", False), ("v32-ep", "v32", True), ("v3-fp8", "v3-fp8", False)],
}
BF16_JOBS = {"v3-bf16-ep"}  # loaded in bfloat16; the others in float32
COMPILE_JOB = ("compiled", "v32", True)  # world size 2 only: compiling on 4 processes over 2 cores is slow
NCCL = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
# (device type, world size) -> marks: gloo on CPU processes, NCCL on GPUs
RUNS = {("cpu", 2): [], ("cpu", 4): [], ("cuda", 2): NCCL}
CASES = [pytest.param(device_type, world_size, name, checkpoint, marks=marks, id=f"{device_type}{world_size}-{name}")
         for (device_type, world_size), marks in RUNS.items() for name, checkpoint, _ in JOBS[world_size]]


def routing_margin(router: Router, x: torch.Tensor) -> float:
    """The smallest gap, over the tokens of `x`, at one of the router's boundaries: between the last group kept and
    the next (group-limited routing), and between the last expert chosen and the next. Noise below it may change the
    experts chosen, and with them the logits by far more than any tolerance here."""
    _, choice, group_scores = router.rank(x)

    def boundary_gap(values: torch.Tensor, kept: int) -> torch.Tensor:
        ranked = values.sort(-1, descending=True).values
        return ranked[:, kept - 1] - ranked[:, kept]

    gaps = [boundary_gap(choice, router.config.num_experts_per_tok)]
    if group_scores is not None:
        gaps.append(boundary_gap(group_scores, router.config.topk_group))
    return torch.stack(gaps).min().item()


def make_prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(20)  # routing margins >= 1.4e-3 in every checkpoint
    return [torch.randint(2, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@torch.no_grad()
def greedy_steps(model) -> dict:
    """Prefill (every token's logits), DECODE_STEPS greedy steps of one token per sequence, then one of two (the
    greedy token and the runner-up), then a continuation of five tokens per sequence (`prefill` into the used rows).
    Returns the tokens fed, each step's logits and its smallest routing margin."""
    margins = []
    for router in (m for m in model.modules() if isinstance(m, Router)):
        router.register_forward_pre_hook(lambda router, args: margins.append(routing_margin(router, args[0])))
    prompts = make_prompts(model.config.vocab_size)
    cache = PagedKVCache(model.config, num_blocks=6, max_batch_size=len(prompts), max_seq_len=128,
                         device=model.lm_head.weight.device)
    logits = [prefill(model, cache, prompts, last_only=False)]
    step_margins = [min(margins, default=float("inf"))]
    last = logits[0][torch.tensor(PROMPT_LENGTHS).cumsum(0) - 1]
    tokens = []
    for step in range(DECODE_STEPS + 1):
        s_q = 1 if step < DECODE_STEPS else 2
        new = last.topk(s_q).indices
        tokens.append(new.tolist())
        for seq in range(len(prompts)):
            cache.extend(seq, s_q)
        margins.clear()
        logits.append(decode_step(model, cache, new))
        step_margins.append(min(margins, default=float("inf")))
        last = logits[-1].view(len(prompts), s_q, -1)[:, -1]
    # every row continued by its greedy token and four more (prefill into rows that hold tokens: the decode path with
    # s_q up to 3 a pass), every token's logits
    more = [[token, *prompt[2:6]] for token, prompt in zip(last.argmax(-1).tolist(), prompts)]
    tokens.append(more)
    margins.clear()
    logits.append(prefill(model, cache, more, last_only=False, chunk=3))
    step_margins.append(min(margins, default=float("inf")))
    return {"tokens": tokens, "logits": [t.cpu().contiguous() for t in logits], "margins": step_margins}


def generate_tokens(model, step) -> list[list[int]]:
    prompts = make_prompts(model.config.vocab_size)
    cache = PagedKVCache(model.config, num_blocks=6, max_batch_size=len(prompts), max_seq_len=128,
                         device=model.lm_head.weight.device)
    return generate(model, cache, prompts, 5, step=step)[0]


def job_dtype(name: str) -> torch.dtype:
    return torch.bfloat16 if name in BF16_JOBS else torch.float32


def _worker(rank: int, device_type: str, world_size: int, port: int, paths: dict, jobs: list, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for name, checkpoint, expert_parallel in jobs:
        parallel, device = init_parallel(world_size, world_size if expert_parallel else 1, device_type)
        model = load_model(paths[checkpoint], job_dtype(name), device, parallel)
        if name == COMPILE_JOB[0]:
            # on CUDA a step inductor cannot capture in a CUDA graph raises instead of running eagerly
            torch._inductor.config.triton.cudagraph_or_error = device.type == "cuda"
            result = {"eager": generate_tokens(model, decode_step),
                      "compiled": generate_tokens(model, compile_decode_step(device))}
        else:
            result = greedy_steps(model)
        result["backend"] = dist.get_backend()
        torch.save(result, out_dir / f"{name}-rank{rank}.pt")
    end_job()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(hf_checkpoints, tmp_path_factory) -> dict:
    paths = {"v2": hf_checkpoints("deepseek_v2")[0], "v3": hf_checkpoints("deepseek_v3")[0],
             "v32": hf_checkpoints("deepseek_v32", vocab_size=127)[0]}
    stored = fp8_checkpoint(load_file(paths["v3"] / SINGLE_FILE))
    paths["v3-fp8"] = tmp_path_factory.mktemp("v3-fp8")
    write_checkpoint(paths["v3-fp8"], paths["v3"], stored, shards=3)
    return paths


@pytest.fixture(scope="module")
def parallel_runs(checkpoints, tmp_path_factory):
    """(device type, world size) -> the directory of every rank's results, each spawned once."""
    runs = {}

    def get(device_type: str, world_size: int):
        if (device_type, world_size) not in runs:
            out_dir = tmp_path_factory.mktemp(f"parallel-{device_type}{world_size}")
            jobs = JOBS[world_size] + ([COMPILE_JOB] if world_size == 2 else [])
            mp.spawn(_worker, args=(device_type, world_size, free_port(), checkpoints, jobs, out_dir),
                     nprocs=world_size)
            runs[device_type, world_size] = out_dir
        return runs[device_type, world_size]

    return get


def rank_results(out_dir, name: str, world_size: int, device_type: str) -> list[dict]:
    """Each rank's result, which ran over NCCL on CUDA and gloo on the CPU."""
    results = [torch.load(out_dir / f"{name}-rank{rank}.pt") for rank in range(world_size)]
    assert all(result["backend"] == ("nccl" if device_type == "cuda" else "gloo") for result in results)
    return results


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    error = ((ours - theirs).abs().amax(-1) / theirs.abs().amax(-1)).max()
    assert error <= tol, f"{what}: relative logit error {error:.2e} > {tol:.0e}"


@pytest.mark.parametrize("device_type, world_size, name, checkpoint", CASES)
def test_matches_one_process(checkpoints, parallel_runs, device_type, world_size, name, checkpoint):
    out_dir = parallel_runs(device_type, world_size)
    bf16 = name in BF16_JOBS
    reference = greedy_steps(load_model(checkpoints[checkpoint], job_dtype(name), device_type))
    ranks = rank_results(out_dir, name, world_size, device_type)
    for rank, result in enumerate(ranks):
        assert result["tokens"] == reference["tokens"], f"rank {rank}: greedy tokens differ from one process's"
        assert all(torch.equal(a, b) for a, b in zip(result["logits"], ranks[0]["logits"])), f"rank {rank} logits"
    prefill_tol = BF16_MODEL_TOL if bf16 else BF16_TOL if checkpoint == "v32" else FP32_TOL
    decode_tol = BF16_MODEL_TOL if bf16 else BF16_TOL
    for step, (ours, theirs) in enumerate(zip(ranks[0]["logits"], reference["logits"])):
        assert ours.shape == theirs.shape
        assert reference["margins"][step] > (BF16_MODEL_MARGIN if bf16 else MIN_ROUTING_MARGIN), (
            f"{checkpoint}, step {step}: ambiguous routing (margin {reference['margins'][step]:.1e}): the test data's "
            "fault, not the split's; choose another prompt seed")
        assert_close(ours, theirs, prefill_tol if step == 0 else decode_tol, f"{name}, tp {world_size}, step {step}")


@pytest.mark.parametrize("device_type", ["cpu", pytest.param("cuda", marks=NCCL)])
def test_compiled_decode_step(checkpoints, parallel_runs, device_type):
    """torch.compile(fullgraph=True) of the decode step with the functional collectives (2 ranks): the same tokens
    as the eager step, and as one process."""
    name, checkpoint, _ = COMPILE_JOB
    reference = generate_tokens(load_model(checkpoints[checkpoint], torch.float32, device_type), decode_step)
    for result in rank_results(parallel_runs(device_type, 2), name, 2, device_type):
        assert result["eager"] == reference
        assert result["compiled"] == reference


@pytest.mark.parametrize("dim, start, stop", [(0, 128, 256), (0, 96, 192), (0, 250, 300), (1, 40, 200)])
def test_fp8_part(tmp_path, dim, start, stop):
    """A part of an FP8 weight (on 128-block boundaries or inside blocks, up to a partial last block) is exactly
    that part of the whole weight, dequantized."""
    weight = torch.randn(300, 200) * torch.logspace(-2, 2, 300)[:, None]
    fp8, scale_inv = quantize_fp8_blocks(weight)
    path = tmp_path / SINGLE_FILE
    save_file({"w.weight": fp8, "w.weight_scale_inv": scale_inv}, path)
    with safe_open(path, framework="pt") as f:
        files = {"w.weight": path, "w.weight_scale_inv": path}
        whole = _read(f, path, "w.weight", files, (128, 128))
        part = _read(f, path, "w.weight", files, (128, 128), Split(dim, start, stop, weight.shape[dim]))
    assert torch.equal(part, whole.narrow(dim, start, stop - start))


def test_splits():
    """Without a process group: the splits `shard_model` records, and sizes that do not split."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3", vocab_size=127))
    parallel = Parallel(4, 4, 3, None)
    model = build_model(config, torch.float32, "meta", parallel)
    splits = parallel.splits
    assert splits["model.embed_tokens.weight"] == Split(0, 96, 127, 127)  # rows 96..127 of 32, the last one padding
    assert splits["model.layers.0.self_attn.q_b_proj.weight"] == Split(0, 3 * 96, 4 * 96, 4 * 96)
    assert splits["model.layers.0.self_attn.o_proj.weight"] == Split(1, 3 * 32, 4 * 32, 4 * 32)
    assert splits["model.layers.1.mlp.experts.down_proj"] == Split(0, 6, 8, 8)
    # gate_up_proj (gate rows then up rows) is recorded per half, under the checkpoint's projection names
    assert splits["model.layers.1.mlp.experts.gate_proj"] == splits["model.layers.1.mlp.experts.up_proj"] \
        == Split(0, 6, 8, 8)
    assert "model.layers.1.mlp.experts.gate_up_proj" not in splits
    inter = config.moe_intermediate_size
    tp_only = Parallel(2, 1, 1, None)  # experts split by intermediate rows: each half of gate_up_proj on its own
    build_model(config, torch.float32, "meta", tp_only)
    assert tp_only.splits["model.layers.1.mlp.experts.gate_proj"] == Split(1, inter // 2, inter, inter)
    assert tp_only.splits["model.layers.1.mlp.experts.up_proj"] == Split(1, inter // 2, inter, inter)
    assert tp_only.splits["model.layers.1.mlp.experts.down_proj"] == Split(2, inter // 2, inter, inter)
    assert splits["model.layers.1.mlp.shared_experts.down_proj.weight"] == Split(1, 24, 32, 32)
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" not in splits  # replicated
    assert model.model.layers[1].mlp.experts.first_expert == 6
    with pytest.raises(ValueError, match="num_attention_heads"):
        build_model(config, torch.float32, "meta", Parallel(3, 1, 0, None))
    with pytest.raises(ValueError, match="ep must be 1 or tp"):
        Parallel(4, 2, 0, None)


def test_a_rank_past_a_tiny_vocabulary_holds_none_of_it():
    """vocab 5 over 4 ranks: 2 rows a rank, so rank 3's rows (6, 7) lie past the end: an empty split, not a negative
    one, and its random draw and its embedding (every id elsewhere: zeros) work."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3", vocab_size=5))
    parallel = Parallel(4, 1, 3, None)
    model = random_model(config, parallel=parallel)
    assert parallel.splits["model.embed_tokens.weight"] == Split(0, 5, 5, 5)
    assert torch.equal(model.model.embed_tokens.weight, torch.zeros_like(model.model.embed_tokens.weight))


def test_a_row_parallel_bias_is_added_once_after_the_sum():
    """RowParallelLinear (o_proj with attention_bias, the MLPs' down_proj): each rank's partial product is summed over
    the ranks, then the (replicated) bias is added once, not once per rank. The all-reduce is faked: two ranks with
    the same partial sums."""
    from models.parallel import RowParallelLinear

    class TwoRanks:
        def all_reduce(self, x):
            return 2 * x

    layer = RowParallelLinear(4, 3, bias=True, parallel=TwoRanks())
    with torch.no_grad():
        layer.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
        layer.bias.copy_(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.randn(5, 4)
    assert torch.allclose(layer(x), 2 * x @ layer.weight.T + layer.bias)


@pytest.mark.parametrize("overrides, ep", [
    (dict(first_k_dense_replace=0, intermediate_size=97), 1),  # every layer MoE: no dense MLP
    (dict(first_k_dense_replace=2, moe_intermediate_size=33, n_routed_experts=9, n_group=1, topk_group=1), 2),  # none
], ids=["all-moe", "all-dense"])
def test_only_the_mlps_a_model_has_must_split(overrides, ep):
    """A size is checked only where the model has the MLP that splits it: an all-MoE model builds no dense MLP (its
    intermediate_size is unused), an all-dense one (first_k_dense_replace = layers) no experts."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3", **overrides))
    for rank in range(2):
        build_model(config, torch.float32, "meta", Parallel(2, ep, rank, None))
    with pytest.raises(ValueError, match=r"intermediate_size \(97\)"):  # a dense first layer: it must split
        build_model(DeepseekConfig.from_dict(tiny_config("deepseek_v3", intermediate_size=97)), torch.float32,
                    "meta", Parallel(2, 1, 0, None))


@pytest.mark.parametrize("overrides, tp, ep, what", [
    (dict(n_routed_experts=6, n_group=2, topk_group=1), 4, 4, r"n_routed_experts \(6\)"),
    (dict(moe_intermediate_size=30), 4, 1, r"^moe_intermediate_size \(30\)"),
    (dict(moe_intermediate_size=30), 4, 4, r"moe_intermediate_size \* n_shared_experts \(30\)"),
], ids=["experts-over-ep", "expert-rows-over-tp", "shared-expert-rows-over-tp"])
def test_uneven_expert_splits_are_refused(overrides, tp, ep, what):
    """Routed experts that do not partition over the ep ranks, or expert / shared-expert rows that do not split over
    tp: `shard_model` would floor the sizes and drop the rest (6 experts over 4 ranks: 1 each, experts 4 and 5 held
    by no rank; 30 rows: 7 a rank), so the model would run on without them."""
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3", **overrides))
    with pytest.raises(ValueError, match=what):
        build_model(config, torch.float32, "meta", Parallel(tp, ep, 0, None))


LOGITS_PROMPTS = [[3, 4, 5], [6, 7]]


@torch.no_grad()
def plain_logits(model) -> dict:
    """A packed prefill's logits (every token: 5 rows) and one decode step's of one sequence (1 row), outside
    inference mode."""
    cache = PagedKVCache(model.config, 2, 2, 64, "fp32", model.lm_head.weight.device)
    logits = {"prefill": prefill(model, cache, LOGITS_PROMPTS, last_only=False)}
    cache.extend(0, 1)
    logits["decode"] = decode_step(model, cache, torch.tensor([[8]]))
    return logits


def _logits_worker(rank: int, world_size: int, port: int, out_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel, _ = init_parallel(world_size)
    config = DeepseekConfig.from_dict(tiny_config("deepseek_v3", vocab_size=127))
    model = random_model(config, parallel=parallel)
    logits = plain_logits(model)
    torch.save({"types": {k: (type(v).__name__, v.is_contiguous()) for k, v in logits.items()}, **logits,
                "sampled": sampled_tokens(model, seed=rank)}, out_dir / f"rank{rank}.pt")
    end_job()


def sampled_tokens(model, seed: int) -> list[list[int]]:
    """Tokens drawn at temperature 1 with a generator seeded `seed`."""
    cache = PagedKVCache(model.config, 2, 2, 64, "fp32", model.lm_head.weight.device)
    return generate(model, cache, LOGITS_PROMPTS, 6, temperature=1.0, eos_token_ids=(),
                    generator=torch.Generator().manual_seed(seed))[0]


def test_sharded_logits_are_plain_contiguous_tensors(tmp_path):
    """The LM head's gathered logits (vocabulary 127 over 2 ranks: padded) come back as one process's do: a plain,
    contiguous `(T, vocab)` tensor, not a transposed view of the gathered blocks nor (outside inference mode) the
    functional collective's AsyncCollectiveTensor, so `view(-1)` works and `torch.load` reads them saved. Sampled
    tokens are the same on every rank (rank 0's), though each rank's generator is seeded differently."""
    mp.spawn(_logits_worker, args=(2, free_port(), tmp_path), nprocs=2)
    model = random_model(DeepseekConfig.from_dict(tiny_config("deepseek_v3", vocab_size=127)))
    reference = plain_logits(model)
    # each rank draws with its own generator (seeded by its rank): the tokens must still be rank 0's, which `generate`
    # broadcasts; rank 1's own draws are other tokens, so a missing broadcast shows
    rank0_sampled = torch.load(tmp_path / "rank0.pt")["sampled"]
    assert rank0_sampled != sampled_tokens(model, seed=1)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")  # weights_only: plain tensors only
        assert result["types"] == {"prefill": ("Tensor", True), "decode": ("Tensor", True)}
        assert result["sampled"] == rank0_sampled, f"rank {rank}: sampled tokens differ from rank 0's"
        for name, theirs in reference.items():
            assert result[name].shape == theirs.shape
            assert_close(result[name], theirs, FP32_TOL, name)
