"""One micro-batch's loss in the trainer: SFT on demonstrations, SDFT on rollouts against the teacher.

The teacher's scores come from teacher actors (top-k or per-token log-probs, ``TeacherScores``) or from the
trainer's own ``TeacherScorer`` (the full vocabulary, chunked through hidden states where the model splits into
decoder and head). The tensor math is ``sdft_ray/losses.py``; this puts the records into its shape and times
each part. The trainer's actor calls it once per micro-batch, inside DeepSpeed's accumulation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from actors.teacher import TeacherScorer
from sdft_ray.config import Config
from sdft_ray.losses import LossOutput, chunked_sdft_loss, sdft_loss, sft_loss
from sdft_ray.modeling import completion_hidden, completion_logits, lm_head, pad_floats, pad_right
from sdft_ray.records import Sample, TeacherScores

Seconds = dict[str, float]  # forward_s, loss_s, teacher_s


def rollout_logprobs(mb: list[Sample], width: int) -> torch.Tensor:
    """The engine's log-probs of the sampled tokens [B, width]; one per token or an error: zero-filled gaps
    would silently pull the importance weights towards exp(logp_trainer)."""
    for m in mb:
        if len(m.rollout_logprobs) != len(m.completion_ids):
            raise ValueError(f"rollout {m.uid}: {len(m.rollout_logprobs)} log-probs for {len(m.completion_ids)} tokens")
    return pad_floats([m.rollout_logprobs for m in mb], width)


class StudentLoss:
    def __init__(self, cfg: Config, pad: int, teacher: TeacherScorer | None) -> None:
        self.cfg, self.pad, self.teacher = cfg, pad, teacher
        # Rollout log-probs go into the loss for the importance weight (clip 0 makes it 1) and the gap monitor;
        # not with generate_from_teacher: p_student(y|x) / p_engine(y|x, c) would be an off-policy ratio, not an
        # engine-numerics correction (official and TRL turn it off there).
        self.compare_logprobs = not cfg.rollout.generate_from_teacher

    def __call__(
        self, module: torch.nn.Module, mb: list[Any], teacher_rows: dict[str, TeacherScores]
    ) -> tuple[LossOutput, Seconds]:
        """The loss of ``mb`` (``Prompt`` records for SFT, ``Sample`` records for SDFT) through ``module``, and
        the seconds spent in the student's forward, the loss and the teacher."""
        if self.cfg.train.algo == "sft":
            return self._sft(module, mb)
        lo = self.cfg.loss
        comps = [m.completion_ids for m in mb]
        kwargs: dict[str, Any] = {}
        t0 = time.perf_counter()
        if teacher_rows:
            kwargs = _teacher_inputs([teacher_rows[m.uid] for m in mb], lo.estimator, max(len(c) for c in comps))
        else:
            assert self.teacher is not None
            t_prompts = [m.teacher_prompt_ids for m in mb]
            if lo.estimator == "full" and lo.chunk_tokens > 0:
                t_hidden = self.teacher.hidden(t_prompts, comps)
                if t_hidden is not None:  # else a model we cannot split into decoder + head: materialized logits
                    teacher_s = time.perf_counter() - t0
                    out, spent = self._chunked(module, mb, comps, t_hidden)
                    return out, {**spent, "teacher_s": teacher_s}
            kwargs["teacher_logits"] = self.teacher.logits(t_prompts, comps)
        t1 = time.perf_counter()
        logits = completion_logits(
            module, [m.prompt_ids for m in mb], comps, self.pad, self.cfg.train.share_prompt_prefix
        )
        t2 = time.perf_counter()
        dev = logits.device
        out = sdft_loss(
            logits,
            **self._targets(mb, comps, dev),
            estimator=lo.estimator,
            top_k=lo.top_k,
            topk_support=lo.topk_support,
            topk_tail=lo.topk_tail,
            **{k: v.to(dev) for k, v in kwargs.items()},
        )
        return out, {"teacher_s": t1 - t0, "forward_s": t2 - t1, "loss_s": time.perf_counter() - t2}

    def _targets(self, mb: list[Sample], comps: list[list[int]], dev: torch.device) -> dict[str, Any]:
        """What both forms of the SDFT loss take besides the logits: the sampled tokens, their mask, the engine's
        log-probs of them, and the divergence's settings."""
        lo = self.cfg.loss
        ids, mask = pad_right(comps, self.pad)
        rollout_logp = rollout_logprobs(mb, ids.shape[1])  # checked either way: a missing one is an engine fault
        return dict(
            completion_ids=ids.to(dev),
            completion_mask=mask.to(dev),
            divergence_kind=lo.divergence,
            alpha=lo.jsd_alpha,
            rollout_logp=rollout_logp.to(dev) if self.compare_logprobs else None,
            skip_first=lo.skip_first_tokens,
            importance_clip=lo.importance_clip,
        )

    def _sft(self, module: torch.nn.Module, mb: list[Any]) -> tuple[LossOutput, Seconds]:
        t0 = time.perf_counter()
        demos = [m.demonstration_ids for m in mb]
        logits = completion_logits(
            module, [m.prompt_ids for m in mb], demos, self.pad, self.cfg.train.share_prompt_prefix
        )
        t1 = time.perf_counter()
        ids, mask = pad_right(demos, self.pad)
        out = sft_loss(logits, ids.to(logits.device), mask.to(logits.device))
        return out, {"teacher_s": 0.0, "forward_s": t1 - t0, "loss_s": time.perf_counter() - t1}

    def _chunked(
        self, module: torch.nn.Module, mb: list[Sample], comps: list[list[int]], t_hidden: torch.Tensor
    ) -> tuple[LossOutput, Seconds]:
        """The full-vocabulary loss from hidden states, ``loss.chunk_tokens`` tokens of logits at a time."""
        assert self.teacher is not None
        lo = self.cfg.loss
        t0 = time.perf_counter()
        s_hidden = completion_hidden(
            module, [m.prompt_ids for m in mb], comps, self.pad, self.cfg.train.share_prompt_prefix
        )
        assert s_hidden is not None  # same architecture as the teacher, which could be split
        t1 = time.perf_counter()
        dev = s_hidden.device
        out = chunked_sdft_loss(
            s_hidden,
            t_hidden.to(dev),
            lambda h: lm_head(module, h),
            self.teacher.head,
            **self._targets(mb, comps, dev),
            chunk_tokens=lo.chunk_tokens,
        )
        return out, {"forward_s": t1 - t0, "loss_s": time.perf_counter() - t1}


def _teacher_inputs(rows: list[TeacherScores], estimator: str, width: int) -> dict[str, torch.Tensor]:
    """Teacher actors' scores as the loss takes them: per-token log-probs (sampled estimator), or the top-k
    log-probs and their token ids padded to the micro-batch's width (-1e4: no mass on padding)."""
    if estimator == "sampled":
        return {"teacher_logp_tok": pad_floats([r.logp_tok.tolist() for r in rows], width)}
    k = rows[0].logp_k.shape[-1]
    lp = torch.full((len(rows), max(1, width), k), -1e4)
    ix = torch.zeros((len(rows), max(1, width), k), dtype=torch.long)
    for i, r in enumerate(rows):
        lp[i, : len(r.logp_k)] = r.logp_k
        ix[i, : len(r.ids_k)] = r.ids_k
    return {"teacher_logp_k": lp, "teacher_support": ix}
