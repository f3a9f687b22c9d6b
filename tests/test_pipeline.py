"""Multi-step SDFT jobs through real Ray actors on CPU: rollout engines, teacher, DeepSpeed trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from conftest import BACKENDS, tiny_overrides

from sdft_ray.config import load_config
from sdft_ray.driver import SDFTDriver


def _rows(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _run(tiny: dict[str, str], out: Path, keep_driver: bool = False, **extra: object):
    cfg = load_config(None, tiny_overrides(tiny, out, **extra))
    d = SDFTDriver(cfg)
    try:
        summary = d.run()
        if keep_driver:
            return d, summary
    finally:
        if not keep_driver:
            d.shutdown()
    return summary


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdft_loss_decreases_and_weights_reach_rollout_engine(tiny, ray_cluster, tmp_path: Path, backend) -> None:
    """For vLLM the engine-side checksum is computed inside the vLLM worker from the tensors it loaded."""
    base = load_config(None, tiny_overrides(tiny, tmp_path / "x"))
    from sdft_ray.modeling import load_model

    base_sum = sum(p.double().sum().item() for p in load_model(base.model, torch.device("cpu")).parameters())
    d, summary = _run(
        tiny,
        tmp_path,
        keep_driver=True,
        train__steps=12,
        train__batch_size=8,
        train__micro_batch_size=4,
        train__lr_scheduler="constant",
        train__warmup_ratio=0,
        pipeline__verify_weight_checksums=True,
        rollout__backend=backend,
        pipeline__max_staleness=1,
    )
    try:
        assert ray.get(d.actors.rollouts.actors[0].backend_name.remote()).startswith(
            {"hf": "transformers", "vllm": "vllm"}[backend]
        )
        rows = _rows(tmp_path)
        assert len(rows) == 12
        first, last = sum(r["loss"] for r in rows[:3]) / 3, sum(r["loss"] for r in rows[-3:]) / 3
        assert last < 0.6 * first, [r["loss"] for r in rows]
        # every sync (initial + one per step) was checked: engine checksum == trainer checksum
        assert summary["weights_verified"] == 13
        trainer_sd = ray.get(d.actors.trainers[0].state_dict_cpu.remote())
        assert ray.get(d.actors.rollouts.actors[0].checksum.remote()) == ray.get(d.actors.trainers[0].checksum.remote())
        # ...and those weights are trained ones, not the base model
        assert abs(sum(t.double().sum().item() for t in trainer_sd.values()) - base_sum) > 1e-3
    finally:
        d.shutdown()
    # staleness 1: rollouts lag the trainer by exactly one version after the first step
    assert [r["lag_max"] for r in rows] == [0] + [1] * 11
    ck = tmp_path / "checkpoints"
    final = sorted(ck.glob("step-*"))[-1]
    assert (final / "COMPLETE").exists() and list((final / "student").glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(final / "student")
    for n, p in reloaded.named_parameters():
        torch.testing.assert_close(p, trainer_sd[n])


def test_strictly_on_policy_has_zero_lag(tiny, ray_cluster, tmp_path: Path) -> None:
    _run(tiny, tmp_path, pipeline__max_staleness=0, logging__log_completions=2, rollout__max_new_tokens=16)
    rows = _rows(tmp_path)
    assert [r["lag_max"] for r in rows] == [0, 0, 0]
    # logged completions: 2 per step, the decoded text of what that step trained on
    logged = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [c["step"] for c in logged] == [1, 1, 2, 2, 3, 3]
    assert all(c["text"] and 0 < c["tokens"] <= 16 for c in logged)
    for r in rows:  # clipped_ratio: the share that ran into max_new_tokens, in [0, 1]
        assert 0.0 <= r["clipped_ratio"] <= 1.0 and "completions" not in r
        # on-policy, same weights on both sides: engine and trainer log-probs agree up to numerics
        assert r["logprob_gap"] < 1e-3 and r["logprob_gap_max"] < 1e-2, r


def test_separate_teacher_topk_gets_ema_weights(tiny, ray_cluster, tmp_path: Path) -> None:
    d, summary = _run(
        tiny,
        tmp_path,
        keep_driver=True,
        loss__estimator="topk",
        loss__top_k=5,
        teacher__placement="separate",
        pipeline__verify_weight_checksums=True,
    )
    try:
        # the separate teacher holds exactly the trainer's EMA weights, which differ from the student's
        t_sum = ray.get(d.actors.teachers.actors[0].checksum.remote())
        assert t_sum == ray.get(d.actors.trainers[0].checksum.remote("teacher"))
        assert t_sum != ray.get(d.actors.trainers[0].checksum.remote("student"))
    finally:
        d.shutdown()
    assert summary["weights_verified"] == 2 * 4  # rollout + teacher, initial + 3 steps
    assert all(r["loss"] > 0 for r in _rows(tmp_path))


@pytest.mark.parametrize(
    "extra",
    [
        dict(loss__divergence="reverse_kl", loss__estimator="sampled", teacher__kind="frozen"),
        dict(teacher__kind="student", loss__divergence="jsd"),
    ],
)
def test_other_teachers_and_estimators_run(tiny, ray_cluster, tmp_path: Path, extra: dict) -> None:
    _run(tiny, tmp_path, **extra)
    rows = _rows(tmp_path)
    assert len(rows) == 3 and all(r["skipped_step"] == 0 for r in rows)


def test_sft_baseline_same_pipeline(tiny, ray_cluster, tmp_path: Path) -> None:
    _run(tiny, tmp_path, train__algo="sft", train__steps=8, train__lr_scheduler="constant", train__warmup_ratio=0)
    losses = [r["loss"] for r in _rows(tmp_path)]
    assert losses[-1] < losses[0] * 0.9, losses


def test_least_loaded_dispatch(tiny, tmp_path: Path) -> None:
    d = SDFTDriver(load_config(None, tiny_overrides(tiny, tmp_path, rollout__num_engines=2)))
    d.queue.engine_load = [0, 0]
    assert d.queue.assign(4) == [[0, 2], [1, 3]]  # equal queues: an even split
    d.queue.engine_load = [3, 0]  # engine 0 still busy with 3 prompts (e.g. engine 1 was just restarted)
    assert d.queue.assign(5) == [[3], [0, 1, 2, 4]]


def test_two_engines_both_receive_weights(tiny, ray_cluster, tmp_path: Path) -> None:
    summary = _run(
        tiny,
        tmp_path,
        rollout__num_engines=2,
        rollout__num_cpus=0.25,
        pipeline__verify_weight_checksums=True,
        pipeline__max_staleness=1,
    )
    assert summary["weights_verified"] == 2 * 4  # both engines, initial + 3 steps
    assert [r["lag_max"] for r in _rows(tmp_path)] == [0, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_with_staleness_every_nth_sync_is_still_proven(tiny, ray_cluster, tmp_path: Path, backend: str) -> None:
    """The log-prob gap cannot judge stale rollouts; the periodic checksum proof runs whatever the staleness
    (for vLLM the engine's digest is of the tensors its workers loaded, collected only for those syncs)."""
    summary = _run(
        tiny, tmp_path, rollout__backend=backend, pipeline__max_staleness=1, pipeline__verify_weights_every=2
    )
    assert summary["weights_verified"] == 2  # versions 0 (initial) and 2 of 0..3
    assert [r["lag_max"] for r in _rows(tmp_path)] == [0, 1, 1]


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_gather_full_weights_for_sync_and_checkpoint(tiny, ray_cluster, tmp_path: Path, stage: int) -> None:
    """Under ZeRO-3 parameters are partitioned: sync, EMA and save must gather them bucket by bucket."""
    d, summary = _run(
        tiny,
        tmp_path,
        keep_driver=True,
        train__zero_stage=stage,
        model__gradient_checkpointing=True,
        pipeline__verify_weight_checksums=True,
        pipeline__sync_bucket_mb=0.01,
    )
    try:
        full = ray.get(d.actors.trainers[0].state_dict_cpu.remote())

        # Defined here, not at module level, so that Ray pickles it by value: the actor cannot import the tests.
        def zero3_trace(trainer: object) -> dict:
            """DeepSpeed's ZeRO-3 parameter-fetch trace, complete (prefetching) or not: a private attribute of
            DeepSpeed's coordinator, which nothing shipped needs to read."""
            offload = getattr(trainer.engine.optimizer, "parameter_offload", None)
            return {"complete": offload.get_param_coordinator().is_complete_trace()} if offload is not None else {}

        trace = ray.get(d.actors.trainers[0].__ray_call__.remote(zero3_trace))
    finally:
        d.shutdown()
    assert summary["weights_verified"] == 4
    if stage == 3:
        # our forward skips the top module's hook; the trainer resets the trace itself, so after 3 steps it is
        # complete (DeepSpeed prefetches) instead of recording every fetch for ever
        assert trace["complete"], trace
    assert all(t.numel() > 0 for t in full.values())  # gathered, not the empty ZeRO-3 placeholders
    from transformers import AutoModelForCausalLM

    final = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    saved = dict(AutoModelForCausalLM.from_pretrained(final / "student").named_parameters())
    for n, t in full.items():
        torch.testing.assert_close(saved[n], t)
    assert all(r["skipped_step"] == 0 and r["loss"] > 0 for r in _rows(tmp_path))


def test_chunked_and_materialized_loss_train_identically(tiny, ray_cluster, tmp_path: Path) -> None:
    """The trainer's chunked path (the default) and the materialized one: same losses, same weights after 2 steps."""
    over = dict(train__steps=2, train__save_every=2, rollout__max_new_tokens=12)
    _run(tiny, tmp_path / "chunked", loss__chunk_tokens=5, **over)
    _run(tiny, tmp_path / "full", loss__chunk_tokens=0, **over)
    a, b = _rows(tmp_path / "chunked"), _rows(tmp_path / "full")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]  # same rollouts
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["loss"] > 0
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "chunked" / "checkpoints" / "step-000002" / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "full" / "checkpoints" / "step-000002" / "student" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", ["sdft", "sft"])
def test_shared_prompt_prefix_trains_exactly_like_the_plain_forward(tiny, ray_cluster, tmp_path: Path, algo) -> None:
    """The trainer's prefix sharing (student, EMA teacher, SFT) changes the cost of a step, not its result."""
    from actors.trainer import StudentTrainer
    from sdft_ray.records import Sample

    system = list(range(10, 40))  # 30 tokens every prompt starts with, as a chat system prompt would be
    items = [
        Sample(
            uid=str(i),
            index=i,
            prompt_ids=system + [5 + i, 6],
            teacher_prompt_ids=system + [8, 5 + i, 9, 7],
            completion_ids=[10 + i, 11, 12, 13, 14, 15, 2][: 6 + i],  # past the 3 skipped tokens
            demonstration_ids=[12, 13 + i, 2],
            rollout_logprobs=[-1.0] * (6 + i),
        )
        for i in range(2)
    ]
    outs = []
    for share in (False, True):
        over = tiny_overrides(
            tiny,
            tmp_path / str(share),
            train__share_prompt_prefix=share,
            train__algo=algo,
            train__batch_size=2,
            train__warmup_ratio=0,
        )
        cfg = load_config(None, over).to_dict()
        tr = ray.remote(StudentTrainer).options(num_cpus=0.5).remote(cfg, 4)
        try:
            first = ray.get(tr.train_step.remote([ray.put(items)]))
            second = ray.get(tr.train_step.remote([ray.put(items)]))  # after an optimizer step and an EMA update
            outs.append((first.loss, second.loss, ray.get(tr.state_dict_cpu.remote())))
        finally:
            ray.kill(tr)
    (a1, a2, sa), (b1, b2, sb) = outs
    # the SDFT loss of a random tiny model is ~1e-6 (teacher and student barely differ): absolute tolerance
    assert b1 == pytest.approx(a1, rel=1e-4, abs=1e-8) and b2 == pytest.approx(a2, rel=1e-4, abs=1e-8) and a1 != a2
    for k in sa:
        # Adam turns float noise in near-zero gradients into a few % of a step (1e-3 each, two steps here)
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4)
