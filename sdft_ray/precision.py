"""What ``model.dtype=auto`` means on a CPU: bf16 where the CPU computes it in hardware, fp32 elsewhere.

Measured, not assumed: the flags say whether bf16 instructions exist (``avx512_bf16``, ``amx_bf16``; Arm's
``bf16``), and a short timed matmul says whether torch's kernels use them at a rate worth having (on an Intel
Xeon with AMX: 673 vs 66 GFLOP/s; on a 2-vCPU AMD EPYC with avx512_bf16: ~410 vs ~150; on a CPU without them
bf16 is emulated and slower than fp32). The driver decides once, logs it, and hands the answer to every actor
in ``SDFT_RAY_CPU_DTYPE`` so that all roles run one precision and none of them probes again. An explicit
``model.dtype`` always wins; on a GPU ``auto`` is bf16, as before.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ENV = "SDFT_RAY_CPU_DTYPE"  # the driver's decision, for the actors (float32 | bfloat16)
BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512 BF16, Arm BF16 (/proc/cpuinfo names)
MIN_SPEEDUP = 1.5  # bf16 must beat fp32 by this much on the probe; below it the halved precision buys little


@dataclass(frozen=True)
class CpuPrecision:
    cpu: str
    flags: tuple[str, ...]  # the bf16 flags this CPU reports
    fp32_gflops: float  # 0 when not probed
    bf16_gflops: float
    dtype: torch.dtype
    source: str  # "probe", "flags", or the environment variable's name

    def describe(self) -> str:
        flags = ", ".join(self.flags) or "no bf16 instructions"
        rate = ""
        if self.fp32_gflops:
            rate = f"; matmul {self.bf16_gflops:.0f} GFLOP/s bf16 vs {self.fp32_gflops:.0f} fp32"
        name = str(self.dtype).removeprefix("torch.")
        return f"model.dtype=auto -> {name} on this CPU ({self.cpu}; {flags}{rate})"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_flags() -> tuple[str, ...]:
    """The bf16 instruction-set flags /proc/cpuinfo lists (empty where it does not exist)."""
    try:
        words: set[str] = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                words.update(line.split(":", 1)[1].split())
    except OSError:
        return ()
    return tuple(f for f in BF16_FLAGS if f in words)


def matmul_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.15) -> float:
    """Best rate of an n x n matmul over about ``seconds`` (the best, not the mean: other work only slows it)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # first call: kernel selection, page faults
    best, spent = float("inf"), 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        a @ b
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return 2 * n**3 / best / 1e9


def decide(flags: tuple[str, ...], fp32_gflops: float, bf16_gflops: float) -> torch.dtype:
    """The rule, apart from the measuring: bf16 needs the instructions and a measured gain."""
    if flags and bf16_gflops >= MIN_SPEEDUP * fp32_gflops:
        return torch.bfloat16
    return torch.float32


@functools.lru_cache(maxsize=1)
def cpu_precision() -> CpuPrecision:
    """This process's answer for ``auto`` on CPU: the driver's if it handed one down, else measured here."""
    cpu, flags = cpu_model(), bf16_flags()
    given = os.environ.get(ENV, "")
    if given:
        if given not in ("float32", "bfloat16"):
            raise ValueError(f"{ENV}={given!r}: expected float32 or bfloat16")
        return CpuPrecision(cpu, flags, 0.0, 0.0, getattr(torch, given), ENV)
    if not flags:  # emulated bf16 is slower than fp32 everywhere measured: no need to time it
        return CpuPrecision(cpu, flags, 0.0, 0.0, torch.float32, "flags")
    fp32, bf16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
    return CpuPrecision(cpu, flags, fp32, bf16, decide(flags, fp32, bf16), "probe")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype`` as a torch dtype on ``device``."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" else cpu_precision().dtype


@functools.cache
def _say_once(line: str) -> None:
    # once per driver process: `continual` and `experiment` start several runs, all on the same answer
    print(f"sdft-ray: {line}", file=sys.stderr, flush=True)


def decide_for_actors(auto_on_cpu: bool) -> dict[str, str]:
    """In the driver: decide ``auto`` once, say it once, and return the environment that hands it to the actors
    (nothing when no role loads a model on a CPU with ``model.dtype=auto``)."""
    if not auto_on_cpu:
        return {}
    p = cpu_precision()
    if p.source != ENV:
        _say_once(p.describe())
    return {ENV: str(p.dtype).removeprefix("torch.")}
