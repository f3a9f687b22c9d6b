"""Teacher role: score the student's own tokens under the demonstration-conditioned prompt.

Kinds (docs/algorithm.md step 5): ``ema`` (EMA of the student, the paper's choice), ``frozen`` (the base model),
``student`` (live student weights, no grad), ``external`` (OpenAI-compatible server, top-k prompt logprobs).

``TeacherScorer`` is the testable core. With the full-vocab estimator it lives *inside* the trainer process
(seq x vocab logits never cross the network); ``TeacherWorker`` is the separate Ray actor for the top-k and
sampled-token estimators, shipping only [T, k] log-probs per sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from actors.base import ActorProcess, pin_visible_gpus
from sdft_ray import lora
from sdft_ray.config import Config, config_from_dict
from sdft_ray.errors import ModelError
from sdft_ray.losses import topk_logprobs
from sdft_ray.modeling import completion_hidden, completion_logits, device_for, lm_head, load_model, load_tokenizer
from sdft_ray.records import Sample, TeacherScores
from sdft_ray.weight_sync import Bucket, load_bucket_into, model_checksum


def _same_device_dtype(
    dst: list[torch.Tensor], src: list[torch.Tensor]
) -> Iterator[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """foreach ops need one device and dtype per call."""
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for d, s in zip(dst, src, strict=True):
        g = groups.setdefault((d.device, d.dtype), ([], []))
        g[0].append(d)
        g[1].append(s)
    yield from groups.values()


def check_same_weights(teacher: torch.nn.Module, student: torch.nn.Module, where: str) -> None:
    """An EMA teacher averages the student's weights into its own: names and shapes must match one to one."""
    theirs = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    ours = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in student.named_parameters()}
    if theirs != ours:
        diff = next((n for n in ours if theirs.get(n) != ours[n]), None) or next(n for n in theirs if n not in ours)
        raise ModelError(
            f"teacher.model_path={where} has other weights than the student ({diff}: {theirs.get(diff)} vs "
            f"{ours.get(diff)}): an EMA teacher must share the student's architecture; use teacher.kind=frozen"
        )


EMA_SLICE = 1 << 20  # elements: a 4 MB fp32 slice of the master stays in cache from the lerp to the rounding


@torch.no_grad()
def lerp_through_master(master: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, rate: float) -> None:
    """master = lerp(master, student, rate); teacher = master rounded to the teacher's dtype.

    A slice at a time, so the widened student slice and the updated master are still in cache when they are
    read again: 12 bytes move per bf16 weight (read student and master, write master and teacher) instead of
    the ~24 of widening the whole student first (Qwen2.5-0.5B on 2 cores: 0.17 s instead of 0.91 s). The same
    operations elementwise, so the same bits as the unsliced way.
    """
    m, s, t = master.view(-1), student.reshape(-1), teacher.view(-1)
    for i in range(0, m.numel(), EMA_SLICE):
        mi = m[i : i + EMA_SLICE]
        mi.lerp_(s[i : i + EMA_SLICE].to(mi.device, torch.float32), rate)
        t[i : i + EMA_SLICE].copy_(mi)


class TeacherScorer:
    """Holds the teacher model (or borrows the live student) and computes teacher-side quantities."""

    def __init__(self, cfg: Config, device: torch.device, student: torch.nn.Module | None = None) -> None:
        self.cfg = cfg
        self.pad = load_tokenizer(cfg.model).pad_token_id
        self.peft: Any = None  # LoRA: the student's peft wrapper, whose base this teacher shares
        self.adapter: str | None = None
        if cfg.model.lora.rank and student is not None:
            # the student's own base; the teacher is an adapter on it: "ema" (EMA), none (frozen), the student's
            self.peft, self.model, self.owns_model = student, lora.hf_model(student), False
            self.adapter = {"ema": lora.TEACHER, "frozen": None, "student": lora.STUDENT}[cfg.teacher.kind]
        elif cfg.teacher.kind == "student" and student is not None:
            self.model = student  # live student: same parameters, scored without grad
            self.owns_model = False
        else:
            self.model = load_model(cfg.model, device, cfg.teacher.model_path or None).eval()
            self.model.requires_grad_(False)
            self.owns_model = True
            if cfg.teacher.kind == "ema" and cfg.teacher.model_path and student is not None:
                check_same_weights(self.model, student, cfg.teacher.model_path)
        self.master: dict[str, torch.Tensor] | None = None  # fp32 EMA state when the teacher is low precision

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # the live-student teacher is the training module itself: score it without dropout, then give it back
        was_training = self.model.training
        self.model.eval()
        try:
            if self.peft is not None:  # the teacher's adapter on the shared base, then the student's again
                with lora.active(self.peft, self.adapter):
                    yield
            else:
                yield
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def logits(self, teacher_prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor:
        with self._eval_mode():
            return completion_logits(
                self.model, teacher_prompts, completions, self.pad, self.cfg.train.share_prompt_prefix
            ).float()

    @torch.no_grad()
    def hidden(self, teacher_prompts: list[list[int]], completions: list[list[int]]) -> torch.Tensor | None:
        """Final hidden states at the completion positions (for the chunked loss), or None if not splittable."""
        with self._eval_mode():
            return completion_hidden(
                self.model, teacher_prompts, completions, self.pad, self.cfg.train.share_prompt_prefix
            )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head(self.model, hidden)

    @torch.no_grad()
    def compact_scores(self, items: list[Sample]) -> list[TeacherScores]:
        """Per-sequence teacher outputs small enough to ship: top-k (logprobs, ids) or sampled-token logprobs."""
        lo = self.cfg.loss
        logits = self.logits([it.teacher_prompt_ids for it in items], [it.completion_ids for it in items])
        out = []
        for i, it in enumerate(items):
            n = len(it.completion_ids)
            row = logits[i, :n]
            if lo.estimator == "sampled":
                ids = torch.tensor(it.completion_ids, dtype=torch.long)
                lp = F.log_softmax(row, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                out.append(TeacherScores(uid=it.uid, logp_tok=lp))
            else:
                vals, idx = topk_logprobs(row, lo.top_k)
                out.append(TeacherScores(uid=it.uid, logp_k=vals, ids_k=idx))
        return out

    def _ema_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """What the EMA averages: every weight, or with LoRA the teacher's adapter (the base is shared, frozen)."""
        if self.peft is not None:
            return lora.adapter_params(self.model, lora.TEACHER)
        return list(self.model.named_parameters())

    def _ema_master(self) -> dict[str, torch.Tensor] | None:
        mode = self.cfg.teacher.ema_master
        if self.master is None and mode != "off":
            params = self._ema_params()
            if any(p.dtype != torch.float32 for _, p in params):
                self.master = {
                    n: p.detach().to("cpu" if mode == "cpu" else p.device, torch.float32, copy=True) for n, p in params
                }
        return self.master

    @torch.no_grad()
    def ema_update(self, student_params: list[tuple[str, torch.Tensor]], rate: float) -> None:
        """teacher = (1 - rate) * teacher + rate * student, for the given (full, gathered) student tensors.

        One fused pass (``_foreach_lerp_``: read both, write one) instead of mul_ then add_, so the update runs
        at memory bandwidth. In fp32: the master copy when the teacher itself is bf16/fp16, rounded into the
        teacher for scoring (``lerp_through_master``).
        """
        params = dict(self.model.named_parameters())
        master = self._ema_master()
        if master is not None:
            for n, s in student_params:
                lerp_through_master(master[n], s, params[n], rate)
            return
        dst = [params[n] for n, _ in student_params]
        src = [
            s if s.device == d.device and s.dtype == d.dtype else s.to(d.device, d.dtype)
            for (_, s), d in zip(student_params, dst, strict=True)
        ]
        for group in _same_device_dtype(dst, src):
            torch._foreach_lerp_(*group, rate)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the teacher: the fp32 master when there is one, so a resume loses nothing."""
        master = self.master or {n: p.detach() for n, p in self._ema_params()}
        return {n: t.detach().cpu().contiguous() for n, t in master.items()}

    @torch.no_grad()
    def load_ema_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if self._ema_master() is not None:
            for n, m in self.master.items():
                if n in state:
                    m.copy_(state[n].to(m.device, torch.float32))
        return missing, unexpected

    def load_bucket(self, bucket: Bucket, verify: bool = False) -> None:
        load_bucket_into(self.model, bucket, verify)

    def checksum(self) -> str:
        return model_checksum((n, p.detach()) for n, p in self.model.named_parameters())


class ExternalTeacher:
    """A teacher behind an OpenAI-compatible server (``vllm serve``): top-k prompt log-probs only
    (``sdft_ray/teacher_server.py`` holds the client; the driver checked the server before any actor started)."""

    def __init__(self, cfg: Config) -> None:
        from sdft_ray.teacher_server import TeacherServer

        self.server = TeacherServer(cfg)
        self.k = cfg.teacher.external_top_k

    def compact_scores(self, items: list[Sample]) -> list[TeacherScores]:
        answers = self.server.score_many([(it.teacher_prompt_ids, it.completion_ids) for it in items])
        out = []
        for it, (ids, vals) in zip(items, answers, strict=True):
            n = len(it.completion_ids)
            lp = torch.full((n, self.k), -1e4)  # a position with fewer than k entries: the rest carry no mass
            ix = torch.zeros((n, self.k), dtype=torch.long)
            for t, (row_ids, row_vals) in enumerate(zip(ids, vals, strict=True)):
                ix[t, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
                lp[t, : len(row_vals)] = torch.tensor(row_vals)
            out.append(TeacherScores(uid=it.uid, logp_k=lp, ids_k=ix))
        return out


class TeacherWorker(ActorProcess):
    """Separate teacher actor (top-k / sampled estimators). Receives EMA or student weights by bucket."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        pin_visible_gpus()
        self.cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(max(1, self.cfg.teacher.torch_threads))
        if self.cfg.teacher.kind == "external":
            self.scorer: Any = ExternalTeacher(self.cfg)
        else:
            self.scorer = TeacherScorer(self.cfg, device_for(self.cfg.teacher.num_gpus))
        self.version = 0

    def score(self, rollout_shards: list[Any]) -> list[TeacherScores]:
        """Scores for every ``Sample`` in the rollout engines' result refs (resolved here, not in the driver)."""
        import ray

        items = [
            it for shard in ray.get(list(rollout_shards), timeout=self.cfg.pipeline.call_timeout_s) for it in shard
        ]
        return self.scorer.compact_scores(items)

    def receive_bucket(self, bucket: Bucket, last: bool, version: int) -> dict[str, float]:
        """One bucket of a streamed object-store sync; the last one adopts ``version``."""
        import time

        t0 = time.perf_counter()
        self.scorer.load_bucket(bucket, self.cfg.pipeline.verify_weight_checksums)
        if last:
            self.version = version
        return {"version": version, "seconds": time.perf_counter() - t0}

    def checksum(self) -> str:
        return self.scorer.checksum()
