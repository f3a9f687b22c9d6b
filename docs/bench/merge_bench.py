"""Cost of folding a rank-16 LoRA into Qwen2.5-1.5B-shaped bf16 linears on CPU: peft's get_delta_weight path
(A, B cast to fp32, B @ A, scale, round, add, round) against one bf16 addmm (fp32 accumulation, one rounding).
Error of each against the exact float64 merge. Usage: merge_bench.py [threads]"""

import resource
import sys
import time

import torch

torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
H, FF, KV, L, r, s = 1536, 8960, 256, 28, 16, 2.0
shapes = [(H, H), (KV, H), (KV, H), (H, H), (FF, H), (FF, H), (H, FF)]  # q k v o gate up down: (out, in)
mats = [
    (
        torch.randn(o, i).mul(0.02).bfloat16(),
        torch.randn(r, i).mul(0.01).bfloat16(),
        torch.randn(o, r).mul(0.01).bfloat16(),
    )
    for o, i in shapes
]


def peft_way(W, A, B):
    return W + ((B.float() @ A.float()) * s).to(torch.bfloat16)


def addmm_way(W, A, B):
    return torch.addmm(W, B, A, alpha=s)


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


for name, fn in (("peft (fp32 delta)", peft_way), ("addmm bf16", addmm_way)) * 2:
    f0, t0 = faults(), time.perf_counter()
    for _ in range(L):
        for W, A, B in mats:
            out = fn(W, A, B)
    dt = time.perf_counter() - t0
    err = max(
        ((fn(W, A, B).double() - (W.double() + s * (B.double() @ A.double()))).abs().max().item()) for W, A, B in mats
    )
    ulp = max((W.double().abs().max().item() * 2**-8) for W, _, _ in mats)
    print(
        f"{name:18s} {dt:6.2f} s for {L} layers, {faults() - f0:8d} minor faults, "
        f"max |err| {err:.2e} (bf16 ulp at max |W| {ulp:.1e})"
    )
