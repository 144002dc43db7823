"""Times the routed experts of one DeepSeek-V2-Lite MoE layer for one token on the GPU: the routed_experts op (Triton
GEMVs) against the grouped-GEMM path, each captured in a CUDA graph and replayed (8 layers of weights, beyond L2).
Run from the repository root with PYTHONPATH=$PWD:$PWD/scripts; output in moe_few_tokens_h200.log."""
import torch
from models.deepseek import Experts
from flashmla_ops.moe import routed_experts_reference

torch.manual_seed(0)
hidden, inter, num_experts, top_k = 2048, 1408, 64, 6
layers = [Experts.__new__(Experts) for _ in range(8)]
for e in layers:
    torch.nn.Module.__init__(e)
    e.gate_up_proj = torch.nn.Parameter(torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) / 45)
    e.down_proj = torch.nn.Parameter(torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16) / 37)
    e.first_expert = 0
x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)
weights = torch.rand(1, top_k, device="cuda")
experts = torch.randperm(num_experts, device="cuda")[:top_k][None]
with torch.no_grad():
    for name, run in [
        ("routed_experts op (Triton GEMVs)", lambda e: torch.ops.flashmla.routed_experts(x, e.gate_up_proj, e.down_proj, weights, experts)),
        ("grouped GEMM path", lambda e: e.grouped(x, weights, experts)),
    ]:
        for e in layers:
            run(e)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [run(e) for e in layers]
        for _ in range(3):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        us = start.elapsed_time(end) * 1000 / 20 / len(layers)
        nbytes = top_k * 3 * inter * hidden * 2
        ref = routed_experts_reference(x, layers[-1].gate_up_proj, layers[-1].down_proj, weights, experts)
        err = ((outs[-1].float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        print(f"{name}: {us:.1f} us per layer, {nbytes / us / 1e3:.0f} GB/s of the chosen experts' weights, rel err {err:.1e}")
