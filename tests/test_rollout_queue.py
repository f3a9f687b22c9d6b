"""Control logic without actors: the rollout queue's relaunch (its dispatch: test_pipeline.py), and the driver's
verdict on whether the engines sampled from the trainer's weights. Fakes stand in for the engines (they only
record calls)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from sdft_ray.config import Config
from sdft_ray.data import PromptSampler, TokenizedExample
from sdft_ray.driver import SDFTDriver
from sdft_ray.errors import WeightSyncError
from sdft_ray.records import StepResult
from sdft_ray.rollout_queue import RolloutQueue


class FakeEngine:
    """Records what it was asked to sample; the 'ref' it returns names the call."""

    def __init__(self, name: str) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.generate = SimpleNamespace(remote=self._generate)
        self.name = name

    def _generate(self, prompts: list[Any], seed: int) -> str:
        self.calls.append(([p.uid for p in prompts], seed))
        return f"{self.name}:{len(self.calls) - 1}"


def _queue(num_rollouts: int = 2, engines: int = 2) -> RolloutQueue:
    cfg = Config()
    cfg.train.batch_size, cfg.rollout.num_rollouts, cfg.train.seed = 3, num_rollouts, 7
    data = [
        TokenizedExample(index=i, prompt_ids=[i], teacher_prompt_ids=[i, i], demonstration_ids=[1]) for i in range(10)
    ]
    return RolloutQueue(cfg, data, PromptSampler(len(data), 3, seed=7), engines)


def test_relaunch_sends_every_step_again_to_the_same_engines_with_the_same_seeds() -> None:
    q = _queue()
    engines = [FakeEngine("e0"), FakeEngine("e1")]
    scored: list[list[str]] = []
    teacher = SimpleNamespace(score=SimpleNamespace(remote=lambda refs: scored.append(list(refs)) or "t"))
    q.launch(4, engines, [teacher])
    q.launch(5, engines, [teacher])  # launched while step 4 is in flight: the loads shape its split
    first = [list(e.calls) for e in engines]
    assert q.engine_load == [6, 6] and sum(len(u) for e in first for u, _ in e) == 12  # 3 prompts x 2 rollouts x 2
    assert {u for e in first for uids, _ in e for u in uids} == {
        f"{s}-{j}-{k}" for s in (4, 5) for j in range(3) for k in range(2)
    }
    for e in engines:
        e.calls.clear()
    q.relaunch(engines, [teacher])  # the engines were restarted: every in-flight ref may be gone
    assert [e.calls for e in engines] == first  # same prompts, same engine, same seed: the same samples
    assert q.engine_load == [6, 6] and [b.step for b in q.batches] == [4, 5]
    assert scored[-2:] == [["e0:0", "e1:0"], ["e0:1", "e1:1"]]  # the new refs went on to the teacher
    q.pop()
    assert q.engine_load == [3, 3]


def _result(lag: int, gap: float) -> StepResult:
    zero = dict.fromkeys(
        ("loss", "kl", "importance_weight", "logprob_gap_max", "clipped_tokens", "grad_norm", "lr", "completion_len",
         "clipped_ratio", "lag_mean", "rollout_s", "teacher_s", "train_s", "ema_s"), 0.0)  # fmt: skip
    return StepResult(**zero, logprob_gap=gap, tokens=10, skipped_step=0, lag_max=lag, version=3)


def _driver(staleness: int, algo: str = "sdft") -> SDFTDriver:
    d = SDFTDriver.__new__(SDFTDriver)  # only the three fields the check reads
    d.cfg, d.step, d.version = Config(), 3, 3
    d.cfg.pipeline.max_staleness, d.cfg.train.algo = staleness, algo
    return d


def test_engine_weights_verdict() -> None:
    limit = Config().pipeline.max_logprob_gap
    _driver(0).check_engine_weights([_result(0, limit / 2), _result(0, 0.0)])  # on-policy, close: fine
    with pytest.raises(WeightSyncError, match="1 versions old"):
        _driver(0).check_engine_weights([_result(0, 0.0), _result(1, 0.0)])  # a sync never landed
    with pytest.raises(WeightSyncError, match="not sampling from the trainer's weights v2"):
        _driver(0).check_engine_weights([_result(0, 2 * limit)])  # landed without its weights
    _driver(1).check_engine_weights([_result(1, 2 * limit)])  # stale by design: the lag itself widens the gap
    _driver(0, "sft").check_engine_weights([_result(0, 2 * limit)])  # SFT trains on demonstrations
