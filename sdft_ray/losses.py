"""SDFT divergence losses: pure tensor code, no Ray, no models.

Shapes: B sequences, T completion positions, V vocabulary. ``mask`` is 1 on completion tokens that count.
All reductions follow docs/algorithm.md: sum over the vocabulary, mean over a sequence's counted tokens, then a
mean over the batch of importance-weighted sequence losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# log-probs below this are treated as zero probability; keeps 0 * log(0) terms (e.g. -inf logits of padded
# vocab rows, or an empty top-k tail) from turning into NaN values or NaN gradients.
_LOGP_FLOOR = -1e4


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim, from log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(logp_student: torch.Tensor, logp_teacher: torch.Tensor, kind: str, alpha: float = 0.5) -> torch.Tensor:
    """Per-position divergence between two normalized log-prob tensors [..., V] -> [...].

    forward_kl = KL(teacher || student) (the official code's default, used for all paper numbers),
    reverse_kl = KL(student || teacher), jsd = generalized JSD with mixture M = (1-alpha) S + alpha T,
    alpha * KL(T || M) + (1 - alpha) * KL(S || M), as in TRL's GKD / the SDFT reference code.
    """
    ls = logp_student.clamp(min=_LOGP_FLOOR)
    lt = logp_teacher.clamp(min=_LOGP_FLOOR)
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "jsd":
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"jsd alpha must be in (0, 1), got {alpha}")
        mix = torch.logsumexp(torch.stack([ls + math.log(1 - alpha), lt + math.log(alpha)]), dim=0)
        return alpha * _kl(lt, mix) + (1 - alpha) * _kl(ls, mix)
    raise ValueError(f"unknown divergence {kind!r}")


def full_vocab_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, alpha: float = 0.5
) -> torch.Tensor:
    """[B, T, V] logits -> [B, T] divergence over the full vocabulary (float32 math)."""
    return divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.float(), -1), kind, alpha)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocab-normalized log-probs of the top-k tokens: ([..., k] logprobs, [..., k] indices)."""
    logp = F.log_softmax(logits.float(), -1)
    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return vals, idx


def _restrict(logp_k: torch.Tensor, tail: bool) -> torch.Tensor:
    """Turn full-vocab log-probs gathered on a support into a distribution over the support (+ tail)."""
    if not tail:
        return F.log_softmax(logp_k, -1)
    mass = torch.logsumexp(logp_k, -1, keepdim=True)
    # log(1 - sum p_k), floored: the top-k may hold all the mass (tail 0) up to rounding.
    tail_logp = torch.log((-torch.expm1(mass.clamp(max=0.0))).clamp(min=1e-12))
    return torch.cat([logp_k, tail_logp], -1)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_logp_k: torch.Tensor,
    support: torch.Tensor,
    kind: str,
    alpha: float = 0.5,
    tail: bool = True,
) -> torch.Tensor:
    """Divergence restricted to a top-k support [B, T, k] (teacher's or student's top-k indices).

    ``teacher_logp_k`` are the teacher's full-vocab-normalized log-probs on ``support``; this is all that
    needs to travel from a separate teacher actor.
    """
    student_logp_k = F.log_softmax(student_logits.float(), -1).gather(-1, support)
    return divergence(_restrict(student_logp_k, tail), _restrict(teacher_logp_k.float(), tail), kind, alpha)


def sampled_token_reverse_kl(student_logp_tok: torch.Tensor, teacher_logp_tok: torch.Tensor) -> torch.Tensor:
    """Per-token surrogate whose gradient is the score-function estimate of grad KL(student || teacher).

    Value per token: stopgrad(log p_s(y_t) - log p_t(y_t)) * log p_s(y_t).
    """
    return (student_logp_tok - teacher_logp_tok).detach() * student_logp_tok


def loss_mask(completion_mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """Drop the first ``skip_first`` completion tokens of each row (teacher-prompt artifacts)."""
    if skip_first <= 0:
        return completion_mask
    pos = completion_mask.long().cumsum(-1)
    return completion_mask * (pos > skip_first).to(completion_mask.dtype)


@torch.no_grad()
def importance_weights(
    trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Per-sequence truncated importance weight w = mean_t min(exp(lp_trainer - lp_rollout), clip)."""
    if clip <= 0:
        return torch.ones(mask.shape[0], dtype=torch.float32, device=mask.device)
    ratio = torch.exp((trainer_logp.float() - rollout_logp.float()).clamp(max=math.log(clip) + 1.0)).clamp(max=clip)
    m = mask.float()
    return (ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    per_seq: torch.Tensor  # [B] unweighted sequence losses (detached)
    weights: torch.Tensor  # [B] importance weights
    tokens: int  # counted completion tokens
    # engine vs trainer log-probs of the sampled tokens, over the counted tokens (when rollout log-probs are given)
    gap_sum: float = 0.0  # sum of |logp_trainer - logp_rollout|
    gap_max: float = 0.0
    clipped: int = 0  # tokens whose ratio exp(logp_trainer - logp_rollout) exceeds the importance clip


@torch.no_grad()
def logprob_gap(
    out: LossOutput, trainer_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, clip: float
) -> LossOutput:
    """Fill in how far the engine's log-probs of its own samples are from the trainer's recompute.

    Numerics alone keep this small (fp32 on CPU ~1e-3 per token, bf16 on GPU ~0.02); an engine that kept old
    weights after a sync shows up as a jump (TRL #5312: 0.015 -> 0.201), whether or not checksums are on.
    """
    m = mask.bool()
    diff = (trainer_logp.float() - rollout_logp.float())[m]
    if diff.numel():
        size = diff.abs()
        out.gap_sum, out.gap_max = float(size.sum()), float(size.max())
        out.clipped = int((diff > math.log(clip)).sum()) if clip > 0 else 0
    return out


def reduce_loss(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None) -> LossOutput:
    """Mean over each sequence's counted tokens, times its importance weight, mean over the batch."""
    m = mask.to(per_token.dtype)
    per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    w = torch.ones_like(per_seq) if weights is None else weights.to(per_seq.dtype)
    return LossOutput((w * per_seq).mean(), per_seq.detach(), w.detach(), int(mask.sum().item()))


def sdft_loss(
    student_logits: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    divergence_kind: str = "forward_kl",
    alpha: float = 0.5,
    estimator: str = "full",
    teacher_logits: torch.Tensor | None = None,
    teacher_logp_k: torch.Tensor | None = None,
    teacher_support: torch.Tensor | None = None,
    teacher_logp_tok: torch.Tensor | None = None,
    top_k: int = 20,
    topk_support: str = "teacher",
    topk_tail: bool = True,
    rollout_logp: torch.Tensor | None = None,
    skip_first: int = 3,
    importance_clip: float = 2.0,
) -> LossOutput:
    """The whole SDFT objective for one micro-batch, from aligned completion-position logits.

    ``student_logits[b, t]`` is the student's distribution for ``completion_ids[b, t]``. The teacher side is
    given either as full logits (``teacher_logits``), as top-k log-probs on a support, or as log-probs of the
    sampled tokens, matching ``estimator``.
    """
    mask = loss_mask(completion_mask, skip_first)
    student_logp_tok = F.log_softmax(student_logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    if estimator == "full":
        if teacher_logits is None:
            raise ValueError("estimator=full needs teacher_logits")
        per_token = full_vocab_divergence(student_logits, teacher_logits, divergence_kind, alpha)
    elif estimator == "topk":
        if teacher_logp_k is None or teacher_support is None:
            if teacher_logits is None:
                raise ValueError("estimator=topk needs teacher top-k log-probs or teacher_logits")
            src = student_logits if topk_support == "student" else teacher_logits
            teacher_support = src.detach().topk(min(top_k, src.shape[-1]), -1).indices
            teacher_logp_k = F.log_softmax(teacher_logits.float(), -1).gather(-1, teacher_support)
        per_token = topk_divergence(student_logits, teacher_logp_k, teacher_support, divergence_kind, alpha, topk_tail)
    elif estimator == "sampled":
        if divergence_kind != "reverse_kl":
            raise ValueError("the sampled-token estimator is only defined for reverse KL")
        if teacher_logp_tok is None:
            if teacher_logits is None:
                raise ValueError("estimator=sampled needs teacher_logp_tok or teacher_logits")
            teacher_logp_tok = (
                F.log_softmax(teacher_logits.float(), -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            )
        per_token = sampled_token_reverse_kl(student_logp_tok, teacher_logp_tok.float())
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    if rollout_logp is None:
        return reduce_loss(per_token, mask)
    weights = importance_weights(student_logp_tok.detach(), rollout_logp, mask, importance_clip)
    out = reduce_loss(per_token, mask, weights)
    return logprob_gap(out, student_logp_tok.detach(), rollout_logp, mask, importance_clip)


def _chunk_terms(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    ids: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    kind: str,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence and student log-prob of the sampled token for one chunk of N tokens: [N], [N]."""
    s = student_head(student_hidden).float()
    with torch.no_grad():
        t = teacher_head(teacher_hidden).float()
    logp_s = F.log_softmax(s, -1)
    return divergence(logp_s, F.log_softmax(t, -1), kind, alpha), logp_s.gather(-1, ids.unsqueeze(-1)).squeeze(-1)


def chunked_sdft_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher_head: Callable[[torch.Tensor], torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    divergence_kind: str = "forward_kl",
    alpha: float = 0.5,
    rollout_logp: torch.Tensor | None = None,
    skip_first: int = 3,
    importance_clip: float = 2.0,
    chunk_tokens: int = 1024,
) -> LossOutput:
    """``sdft_loss`` with the full-vocabulary estimator, never holding [B, T, V] logits.

    Takes final hidden states [B, T, H] and the two LM heads; only the counted tokens are scored, ``chunk_tokens``
    at a time, each chunk's logits recomputed in backward (activation checkpointing) rather than kept. Peak
    memory for the loss is then a few [chunk, V] tensors instead of several [B, T, V] ones (TRL's chunked JSD and
    Liger's fused linear JSD do the same). Values and gradients equal ``sdft_loss``'s.
    """
    mask = loss_mask(completion_mask, skip_first)
    counted = mask.bool()
    hs, ht, ids = student_hidden[counted], teacher_hidden[counted], completion_ids[counted]
    divs, lps = [], []
    for i in range(0, hs.shape[0], max(1, chunk_tokens)):
        sl = slice(i, i + chunk_tokens)
        d, lp = checkpoint(
            _chunk_terms,
            hs[sl],
            ht[sl],
            ids[sl],
            student_head,
            teacher_head,
            divergence_kind,
            alpha,
            use_reentrant=False,
        )
        divs.append(d)
        lps.append(lp)
    per_token = torch.zeros(mask.shape, dtype=torch.float32, device=hs.device)
    logp_tok = torch.zeros(mask.shape, dtype=torch.float32, device=hs.device)
    if divs:
        per_token = per_token.masked_scatter(counted, torch.cat(divs))
        logp_tok = logp_tok.masked_scatter(counted, torch.cat(lps).detach())
    if rollout_logp is None:
        return reduce_loss(per_token, mask)
    weights = importance_weights(logp_tok, rollout_logp, mask, importance_clip)
    return logprob_gap(reduce_loss(per_token, mask, weights), logp_tok, rollout_logp, mask, importance_clip)


def sft_loss(logits: torch.Tensor, target_ids: torch.Tensor, mask: torch.Tensor) -> LossOutput:
    """Cross-entropy on demonstration tokens, reduced like the SDFT loss (per sequence, then batch)."""
    logp = F.log_softmax(logits.float(), -1).gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return reduce_loss(-logp, mask)
