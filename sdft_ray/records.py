"""The records that travel between actors, one class each.

driver --Prompt--> rollout engine --Sample--> teacher actor --TeacherScores--> trainer --StepResult--> driver

Plain dataclasses: Ray pickles them as they are, and a misspelt field fails at the line that wrote it instead
of as a KeyError three actors later.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(kw_only=True)
class Prompt:
    """One prompt to roll out: a training record (``index`` in the data file) and its copy number in ``uid``."""

    uid: str
    index: int
    prompt_ids: list[int]
    teacher_prompt_ids: list[int] = field(default_factory=list)  # the prompt with the demonstration in context
    demonstration_ids: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class Sample(Prompt):
    """A prompt and the completion the student sampled for it, with the engine's log-prob of every token."""

    completion_ids: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    version: int = 0  # the weight version the engine sampled with: the trainer's step count at that sync
    rollout_s: float = 0.0

    @classmethod
    def of(
        cls, prompt: Prompt, completion_ids: list[int], logprobs: list[float], version: int, seconds: float
    ) -> Sample:
        return cls(
            **{f.name: getattr(prompt, f.name) for f in fields(Prompt)},
            completion_ids=completion_ids,
            rollout_logprobs=logprobs,
            version=version,
            rollout_s=seconds,
        )


@dataclass(kw_only=True)
class TeacherScores:
    """A separate teacher's verdict on one sample, small enough to ship: one of the two forms, per estimator."""

    uid: str
    logp_tok: torch.Tensor | None = None  # estimator "sampled": log p_teacher of each sampled token, [T]
    logp_k: torch.Tensor | None = None  # estimator "topk": the teacher's top-k log-probs per position, [T, k]
    ids_k: torch.Tensor | None = None  # ... and their token ids, [T, k]


@dataclass(kw_only=True)
class StepResult:
    """What one trainer rank reports for one optimizer step (rank-local; the driver averages across ranks)."""

    loss: float
    kl: float  # NaN for SFT, whose per-sequence loss is a cross-entropy
    importance_weight: float
    logprob_gap: float  # engine vs trainer log-probs of the sampled tokens: per-token mean |diff|
    logprob_gap_max: float
    clipped_tokens: float  # share of tokens whose importance weight hit loss.importance_clip
    grad_norm: float
    lr: float
    tokens: int
    completion_len: float
    clipped_ratio: float  # share of completions cut at rollout.max_new_tokens
    skipped_step: int
    lag_mean: float
    lag_max: int
    rollout_s: float
    teacher_s: float
    train_s: float  # student forward + loss + backward + optimizer: the four below and what lies between them
    ema_s: float
    version: int
    forward_s: float = 0.0  # the student's decoder (and, unchunked, its LM head)
    loss_s: float = 0.0  # the loss's forward: with chunk_tokens, the LM heads and the divergence chunk by chunk
    backward_s: float = 0.0  # includes the chunks' recomputation (activation checkpointing)
    optimizer_s: float = 0.0  # DeepSpeed's step: clipping, Adam, and with bf16 the copies to and from the master
    completions: list[dict[str, Any]] = field(default_factory=list)  # decoded, for completions.jsonl (rank 0)

    # averaged over ranks; every other field is rank 0's (tokens are summed)
    MEAN = ("loss", "kl", "importance_weight", "lag_mean", "completion_len", "clipped_ratio", "logprob_gap")

    def metrics(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "completions"}
