"""Teacher role: score the student's own tokens under the demonstration-conditioned prompt.

Kinds (docs/algorithm.md step 5): ``ema`` (EMA of the student, the paper's choice), ``frozen`` (the base model),
``student`` (live student weights, no grad), ``external`` (OpenAI-compatible server, top-k prompt logprobs).

``TeacherScorer`` is the testable core. With the full-vocab estimator it lives *inside* the trainer process
(seq x vocab logits never cross the network); ``TeacherWorker`` is the separate Ray actor for the top-k and
sampled-token estimators, shipping only [T, k] log-probs per sequence.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from actors.base import ActorProcess, pin_visible_gpus
from sdft_ray.config import Config, config_from_dict
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


class TeacherScorer:
    """Holds the teacher model (or borrows the live student) and computes teacher-side quantities."""

    def __init__(self, cfg: Config, device: torch.device, student: torch.nn.Module | None = None) -> None:
        self.cfg = cfg
        self.pad = load_tokenizer(cfg.model).pad_token_id
        if cfg.teacher.kind == "student" and student is not None:
            self.model = student  # live student: same parameters, scored without grad
            self.owns_model = False
        else:
            self.model = load_model(cfg.model, device).eval()
            self.model.requires_grad_(False)
            self.owns_model = True
        self.master: dict[str, torch.Tensor] | None = None  # fp32 EMA state when the teacher is low precision

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        # the live-student teacher is the training module itself: score it without dropout, then give it back
        was_training = self.model.training
        self.model.eval()
        try:
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

    def _ema_master(self) -> dict[str, torch.Tensor] | None:
        mode = self.cfg.teacher.ema_master
        if self.master is None and mode != "off":
            params = list(self.model.named_parameters())
            if any(p.dtype != torch.float32 for _, p in params):
                self.master = {
                    n: p.detach().to("cpu" if mode == "cpu" else p.device, torch.float32, copy=True) for n, p in params
                }
        return self.master

    @torch.no_grad()
    def ema_update(self, student_params: list[tuple[str, torch.Tensor]], rate: float) -> None:
        """teacher = (1 - rate) * teacher + rate * student, for the given (full, gathered) student tensors.

        One fused pass (``_foreach_lerp_``: read both, write one) instead of mul_ then add_, so the update runs
        at memory bandwidth. In fp32 (the master copy when the teacher itself is bf16/fp16), then cast for scoring.
        """
        params = dict(self.model.named_parameters())
        master = self._ema_master()
        dst = [params[n] if master is None else master[n] for n, _ in student_params]
        src = [
            s if s.device == d.device and s.dtype == d.dtype else s.to(d.device, d.dtype)
            for (_, s), d in zip(student_params, dst, strict=True)
        ]
        for group in _same_device_dtype(dst, src):
            torch._foreach_lerp_(*group, rate)
        if master is not None:
            torch._foreach_copy_([params[n] for n, _ in student_params], dst)

    def ema_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the teacher: the fp32 master when there is one, so a resume loses nothing."""
        master = self.master or {n: p.detach() for n, p in self.model.named_parameters()}
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
    """A teacher behind an OpenAI-compatible server (e.g. ``vllm serve``): top-k prompt logprobs only.

    Uses vLLM's ``prompt_logprobs`` and ``return_tokens_as_token_ids`` extensions so that returned
    tokens are ids in the shared vocabulary, not strings that would need re-tokenizing.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.url = cfg.teacher.external_url.rstrip("/") + "/v1/completions"

    def _prompt_logprobs(self, ids: list[int]) -> list[dict[str, Any] | None]:
        body = {
            "model": self.cfg.teacher.external_model or self.cfg.model.path,
            "prompt": ids,
            "max_tokens": 1,
            "prompt_logprobs": self.cfg.teacher.external_top_k,
            "return_tokens_as_token_ids": True,
        }
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        key = os.environ.get("OPENAI_API_KEY")
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(req, timeout=self.cfg.pipeline.call_timeout_s) as resp:
            return json.loads(resp.read())["choices"][0]["prompt_logprobs"]

    def compact_scores(self, items: list[Sample]) -> list[TeacherScores]:
        k = self.cfg.teacher.external_top_k
        out = []
        for it in items:
            plen, comp = len(it.teacher_prompt_ids), it.completion_ids
            rows = self._prompt_logprobs(it.teacher_prompt_ids + comp)[plen : plen + len(comp)]
            vals = torch.full((len(comp), k), -1e4)
            ids = torch.zeros((len(comp), k), dtype=torch.long)
            for t, row in enumerate(rows):
                entries = sorted((row or {}).items(), key=lambda kv: -kv[1]["logprob"])[:k]
                for j, (tok, info) in enumerate(entries):
                    ids[t, j] = int(str(tok).removeprefix("token_id:"))
                    vals[t, j] = float(info["logprob"])
            out.append(TeacherScores(uid=it.uid, logp_k=vals, ids_k=ids))
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
