"""The rollout queue: which prompts each step trains on, and which engine samples each of them.

A step's batch is launched up to ``pipeline.max_staleness`` steps before it trains (generation overlaps
training); ``InFlight`` is one launched step. Only ObjectRefs are held here: samples go engine -> teacher ->
trainer without passing through the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdft_ray.config import Config
from sdft_ray.data import PromptSampler, TokenizedExample
from sdft_ray.records import Prompt


@dataclass
class InFlight:
    step: int
    prompts: list[Prompt]
    rollout_refs: list[Any]  # refs to list[Sample] (SDFT), or one ref to the prompts themselves (SFT)
    teacher_refs: list[Any]  # refs to list[TeacherScores] from separate teacher actors; empty when colocated
    engine_loads: list[tuple[int, int]] = field(default_factory=list)  # (engine, prompts) still in flight


class RolloutQueue:
    def __init__(self, cfg: Config, data: list[TokenizedExample], sampler: PromptSampler, num_engines: int) -> None:
        self.cfg, self.data, self.sampler = cfg, data, sampler
        self.engine_load = [0] * num_engines
        self.batches: list[InFlight] = []

    def __len__(self) -> int:
        return len(self.batches)

    def head(self) -> InFlight:
        return self.batches[0]

    def prompts(self, step: int) -> list[Prompt]:
        """The step's records (the sampler's batch), each ``rollout.num_rollouts`` times for SDFT."""
        copies = self.cfg.rollout.num_rollouts if self.cfg.train.algo == "sdft" else 1
        out = []
        for j, idx in enumerate(self.sampler.batch(step)):
            ex = self.data[idx]
            for k in range(copies):
                out.append(
                    Prompt(
                        uid=f"{step}-{j}-{k}",
                        index=ex.index,
                        prompt_ids=ex.prompt_ids,
                        teacher_prompt_ids=ex.teacher_prompt_ids,
                        demonstration_ids=ex.demonstration_ids,
                    )
                )
        return out

    def launch(self, step: int, engines: list[Any], teachers: list[Any]) -> None:
        """Queue step ``step``: its prompts go to the engines (least loaded first), the engines' sample refs
        straight on to the separate teachers, if any. Every call returns at once."""
        import ray

        prompts = self.prompts(step)
        if self.cfg.train.algo == "sft":  # trains on the demonstrations: nothing to sample
            self.batches.append(InFlight(step, prompts, [ray.put(prompts)], []))
            return
        seed = self.cfg.train.seed * 1_000_003 + step
        refs, loads = [], []
        for e, idx in enumerate(self.assign(len(prompts))):
            if idx:
                refs.append(engines[e].generate.remote([prompts[i] for i in idx], seed * 131 + e))
                loads.append((e, len(idx)))
                self.engine_load[e] += len(idx)
        n = len(teachers)
        teacher_refs = [t.score.remote(refs[i::n]) for i, t in enumerate(teachers) if refs[i::n]]
        self.batches.append(InFlight(step, prompts, refs, teacher_refs, loads))

    def assign(self, n: int) -> list[list[int]]:
        """Least-loaded dispatch: each prompt goes to the engine with the fewest prompts in flight.

        Equal engines with equal queues get an even split; an engine that was just restarted (empty queue)
        or one still busy with a lagging batch gets more or fewer accordingly.
        """
        load = list(self.engine_load)
        shards: list[list[int]] = [[] for _ in load]
        for i in range(n):
            e = min(range(len(load)), key=lambda k: (load[k], k))
            shards[e].append(i)
            load[e] += 1
        return shards

    def pop(self) -> InFlight:
        """The head batch has trained: its engines' load is released."""
        batch = self.batches.pop(0)
        for e, n in batch.engine_loads:
            self.engine_load[e] -= n
        return batch

    def relaunch(self, engines: list[Any], teachers: list[Any]) -> None:
        """After an actor restart every in-flight ref may be lost: launch the same steps again (same seeds)."""
        steps = [b.step for b in self.batches]
        while self.batches:
            self.pop()
        for s in steps:
            self.launch(s, engines, teachers)
