"""Student trainer role: a DeepSpeed engine (ZeRO 0-3, CPU or GPU) running the SDFT (or SFT) loss.

``StudentTrainer`` is a plain class; the Ray actor is ``ray.remote(StudentTrainer)``. With the full-vocab
estimator the teacher forward runs here too (``TeacherScorer``), so seq x vocab teacher logits never leave
the process. The EMA teacher is updated here after every optimizer step.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from actors.base import ActorProcess, pin_visible_gpus
from actors.student_loss import StudentLoss
from actors.teacher import TeacherScorer
from actors.weight_sender import WeightSender
from sdft_ray import lora
from sdft_ray.config import config_from_dict
from sdft_ray.ds_config import deepspeed_config, grad_accum_steps, lr_lambda
from sdft_ray.errors import NonFiniteLossError
from sdft_ray.modeling import (
    device_for,
    load_model,
    load_tokenizer,
)
from sdft_ray.network import free_address, init_process_group
from sdft_ray.records import Sample, StepResult, TeacherScores
from sdft_ray.weight_sync import (
    iter_param_buckets,
)


def inner_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's state, under DeepSpeed's ZeRO / bf16 wrappers."""
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
    return optimizer


@contextmanager
def skip_update(optimizer: Any) -> Iterator[None]:
    """For a step with a non-finite micro-batch (F16): the inner optimizer's step does nothing, so no weight
    moves and Adam's moments and step count are exactly as before (an lr of 0 would still fold the other
    micro-batches' gradients into the moments)."""
    inner = inner_optimizer(optimizer)
    inner.step = lambda *args, **kwargs: None  # shadows the class's step for this one call
    try:
        yield
    finally:
        del inner.step


def _init_distributed_env(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(0 if not torch.cuda.is_available() else int(os.environ.get("LOCAL_RANK", 0))),
    )
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import time; on CPU it must be told before `import deepspeed`.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


class StudentTrainer(ActorProcess, WeightSender):
    def __init__(
        self,
        cfg_dict: dict[str, Any],
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        master_addr: str = "127.0.0.1",
        master_port: int = 0,
    ) -> None:
        pin_visible_gpus()
        self.cfg = cfg = config_from_dict(cfg_dict)
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(max(1, cfg.train.torch_threads))
        _init_distributed_env(rank, world_size, master_addr, master_port)
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        init_process_group(rank, world_size, master_addr, master_port, get_accelerator().communication_backend_name())

        torch.manual_seed(cfg.train.seed)
        self.device = device_for(cfg.train.num_gpus)
        self.tokenizer = load_tokenizer(cfg.model)
        self.pad = self.tokenizer.pad_token_id
        model = load_model(cfg.model, self.device)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.config.use_cache = False
        self.lora = cfg.model.lora.rank > 0
        if self.lora:
            ema = cfg.train.algo == "sdft" and cfg.teacher.kind == "ema"
            model = lora.wrap(model, cfg.model.lora, ema_teacher=ema)
            if cfg.model.gradient_checkpointing:
                model.enable_input_require_grads()  # the frozen embeddings would otherwise cut the graph
        bf16 = next(model.parameters()).dtype == torch.bfloat16
        t = cfg.train
        ds_cfg = deepspeed_config(cfg, bf16)
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: the adapter; no state for the base
        optimizer = None
        if not t.offload_optimizer:
            # bf16 weights: DeepSpeed steps Adam on its fp32 master copies, and the fused kernel does that in one
            # pass per tensor (Qwen2.5-0.5B on 2 cores: 0.25 s vs 2.9 s for torch's per-tensor loop). fp32 keeps
            # the loop: the fused kernel rounds differently in the last bit, and the fp32 path's bits are pinned.
            kernel = {"fused": True} if bf16 else {}
            optimizer = torch.optim.AdamW(trainable, lr=t.lr, betas=t.adam_betas, weight_decay=t.weight_decay, **kernel)
        self.total_steps = total_steps
        sched = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=trainable if optimizer is None else None,
            lr_scheduler=sched,
            config=ds_cfg,
            dist_init_required=False,  # init_process_group above
        )
        if world_size == 1 and t.zero_stage == 0:
            # One rank has nobody to average gradients with, but DeepSpeed's backward still flattens every gradient
            # into buckets, "all-reduces" them over a group of one, divides by 1 and copies them back: exact, and
            # seconds of memory traffic per step on a 0.5B model. ZeRO >= 1 finishes its own buffers in that pass.
            self.engine.enable_backward_allreduce = False
        self.gas = grad_accum_steps(cfg)
        self.version = 0
        self.bad_steps = 0
        self.teacher: TeacherScorer | None = None
        needs_local_teacher = cfg.train.algo == "sdft" and (
            cfg.teacher_colocated or cfg.teacher.kind == "ema"  # separate EMA: the trainer owns the EMA weights
        )
        if needs_local_teacher and cfg.teacher.kind != "external":
            self.teacher = TeacherScorer(cfg, self.device, student=self.engine.module)
        self.loss = StudentLoss(cfg, self.pad, self.teacher)

    # ------------------------------------------------------------ helpers
    def free_address(self) -> tuple[str, int]:
        return free_address()

    @property
    def module(self) -> torch.nn.Module:
        """The transformers model the forwards run (with LoRA: the one inside peft's wrapper, adapters in it)."""
        return lora.hf_model(self.engine.module) if self.lora else self.engine.module

    def _lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, shards: list[Any], teacher_shards: list[Any] | None = None) -> StepResult:
        """One optimizer step on this rank's share of the batch (refs to lists of ``Sample``, or of ``Prompt``
        for SFT; refs to lists of ``TeacherScores`` from separate teachers); returns rank-local metrics."""
        import ray

        timeout = self.cfg.pipeline.call_timeout_s
        items = [it for shard in ray.get(list(shards), timeout=timeout) for it in shard]
        mine = items[self.rank :: self.world_size]
        teacher_rows: dict[str, TeacherScores] = {}
        if teacher_shards:
            for shard in ray.get(list(teacher_shards), timeout=timeout):
                for row in shard:
                    teacher_rows[row.uid] = row
        mbs = self.cfg.train.micro_batch_size
        if len(mine) != mbs * self.gas:
            raise ValueError(f"trainer rank {self.rank}: got {len(mine)} samples, expected {mbs * self.gas}")
        timing = dict.fromkeys(("teacher_s", "forward_s", "loss_s", "backward_s", "optimizer_s"), 0.0)
        t0 = time.perf_counter()
        self.engine.train()
        losses, kls, weights, tokens, bad = [], [], [], 0, False
        gap_sum, gap_max, clipped = 0.0, 0.0, 0
        grad_norm = float("nan")
        for i in range(self.gas):
            mb = mine[i * mbs : (i + 1) * mbs]
            self._zero3_reset_trace()
            out, spent = self.loss(self.module, mb, teacher_rows)
            for k, v in spent.items():
                timing[k] += v
            loss = out.loss
            if not torch.isfinite(loss):
                # Don't backprop NaN/inf: a zero surrogate keeps DeepSpeed's accumulation counters in step,
                # and the update below is suppressed.
                bad = True
                loss = sum((p.sum() * 0.0 for p in self.module.parameters() if p.requires_grad), torch.zeros(()))
            else:
                losses.append(loss.item())
                kls.append(out.per_seq.mean().item())
                weights.append(out.weights.mean().item())
                tokens += out.tokens
                gap_sum, gap_max, clipped = gap_sum + out.gap_sum, max(gap_max, out.gap_max), clipped + out.clipped
            tb = time.perf_counter()
            self.engine.backward(loss)
            to = time.perf_counter()
            timing["backward_s"] += to - tb
            if i == self.gas - 1 and not bad and self.cfg.train.zero_stage == 0:
                grad_norm = self._grad_norm()
            if i == self.gas - 1 and bad:
                with skip_update(self.optimizer):
                    self.engine.step()  # DeepSpeed still zeroes the grads and advances the LR schedule
            else:
                self.engine.step()
            timing["optimizer_s"] += time.perf_counter() - to
        train_s = time.perf_counter() - t0 - timing["teacher_s"]
        if bad:
            self.bad_steps += 1
            if self.bad_steps >= self.cfg.train.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive steps with a non-finite loss (train.max_bad_steps="
                    f"{self.cfg.train.max_bad_steps}); last good checkpoint is intact, resume with "
                    f"train.resume=auto after checking the data/lr"
                )
        else:
            self.bad_steps = 0
        if self.cfg.train.zero_stage > 0:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        t1 = time.perf_counter()
        self._update_teacher()
        if self.cfg.weight_transport == "ipc" and torch.cuda.is_available():
            # colocated with vLLM: give back activations and logits before the engine wakes to generate
            torch.cuda.empty_cache()
        self.version += 1
        sdft = self.cfg.train.algo == "sdft"
        lag = [self.version - 1 - m.version for m in mine if isinstance(m, Sample)]  # SFT: on the data, no lag
        comps = [m.completion_ids if sdft else m.demonstration_ids for m in mine]
        return StepResult(
            loss=sum(losses) / max(1, len(losses)),
            kl=sum(kls) / max(1, len(kls)) if sdft else float("nan"),
            importance_weight=sum(weights) / max(1, len(weights)),
            logprob_gap=gap_sum / max(1, tokens),
            logprob_gap_max=gap_max,
            clipped_tokens=clipped / max(1, tokens),
            grad_norm=grad_norm,
            lr=self._lr(),
            tokens=tokens,
            completion_len=sum(map(len, comps)) / max(1, len(mine)),
            # a rising share of completions cut at the limit is a model that stopped ending its turns
            clipped_ratio=sum(len(c) >= self.cfg.rollout.max_new_tokens for c in comps) / max(1, len(mine))
            if sdft
            else 0.0,
            completions=self._samples(mine),
            skipped_step=int(bad),
            lag_mean=sum(lag) / max(1, len(lag)),
            lag_max=max(lag, default=0),
            rollout_s=max((m.rollout_s for m in mine if isinstance(m, Sample)), default=0.0),
            teacher_s=timing["teacher_s"],
            train_s=train_s,
            ema_s=time.perf_counter() - t1,
            version=self.version,
            **{k: v for k, v in timing.items() if k != "teacher_s"},
        )

    def _samples(self, mine: list[Any]) -> list[dict[str, Any]]:
        """The first ``logging.log_completions`` completions this step trained on, decoded (special tokens kept,
        so a missing end-of-turn shows), for completions.jsonl: what TRL's log_completions shows. Rank 0 only:
        the driver logs rank 0's."""
        n = self.cfg.logging.log_completions if self.cfg.train.algo == "sdft" and self.rank == 0 else 0
        return [
            {
                "uid": m.uid,
                "index": m.index,
                "tokens": len(m.completion_ids),
                "text": self.tokenizer.decode(m.completion_ids, skip_special_tokens=False),
            }
            for m in mine[:n]
        ]

    def _zero3_reset_trace(self) -> None:
        """What the top module's forward pre-hook does under ZeRO-3, which our forward never triggers.

        ``completion_logits`` calls the decoder and the LM head, not the top module, so DeepSpeed's parameter
        coordinator would stay in trace-recording mode for ever: no prefetch, and a recorded order that grows
        by every fetch of every micro-step (deepspeed/runtime/zero/parameter_offload.py, its only caller).
        """
        offload = getattr(self.engine.optimizer, "parameter_offload", None)
        if self.cfg.train.zero_stage == 3 and offload is not None:
            offload.get_param_coordinator().reset_step()

    def _grad_norm(self) -> float:
        # accumulated in fp32 without widening a copy of each bf16 gradient first
        norms = [
            torch.linalg.vector_norm(p.grad, dtype=torch.float32)
            for p in self.module.parameters()
            if p.grad is not None
        ]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    def _update_teacher(self) -> None:
        if self.teacher is None or self.cfg.teacher.kind != "ema":
            return
        rate = self.cfg.teacher.ema_rate
        if self.lora:  # the student's adapter into the teacher's; the base is shared and never moves
            student = lora.adapter_params(self.module, lora.STUDENT)
            self.teacher.ema_update([(lora.teacher_name(n), p.detach()) for n, p in student], rate)
            return
        if self.cfg.train.zero_stage < 3:  # full tensors on this rank already: read them in place, no bucket copies
            self.teacher.ema_update([(n, p.detach()) for n, p in self.module.named_parameters()], rate)
            return
        for b in iter_param_buckets(self.module, self._bucket_bytes(), self.cfg.train.zero_stage, to_cpu=False):
            self.teacher.ema_update(list(zip(b.names, b.tensors, strict=True)), rate)

    # ------------------------------------------------------------ checkpoints
    def save(self, path: str) -> None:
        """Student (HF + safetensors; with LoRA merged, plus the adapters), EMA teacher, and DeepSpeed's
        optimizer/scheduler state (with LoRA it holds the EMA adapter too, as a module weight) under ``path``."""
        root = Path(path)
        student = self.state_dict_cpu("student")
        if self.rank == 0:
            self.module.save_pretrained(root / "student", state_dict=student, safe_serialization=True)
            self.tokenizer.save_pretrained(root / "student")
            if self.lora:  # PEFT format, for PeftModel.from_pretrained(base, ...): the student's, the EMA's in ema/
                self.engine.module.save_pretrained(root / "adapter")
            if self.teacher is not None and self.teacher.owns_model:
                self.teacher.model.save_pretrained(
                    root / "teacher", state_dict=self.teacher.ema_state(), safe_serialization=True
                )
        self.engine.save_checkpoint(str(root / "deepspeed"), tag="state", client_state={"version": self.version})

    def load(self, path: str) -> int:
        from safetensors.torch import load_file

        root = Path(path)
        _, client = self.engine.load_checkpoint(
            str(root / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        self.version = int((client or {}).get("version", 0))
        if self.teacher is not None and self.teacher.owns_model:
            state: dict[str, torch.Tensor] = {}
            for f in sorted((root / "teacher").glob("*.safetensors")):
                state.update(load_file(str(f)))
            missing, unexpected = self.teacher.load_ema_state(state)
            real_missing = [m for m in missing if m not in self._tied_names(self.teacher.model)]
            if real_missing or unexpected:
                raise RuntimeError(f"{root}/teacher: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        return self.version

    @staticmethod
    def _tied_names(model: torch.nn.Module) -> set[str]:
        kept = {n for n, _ in model.named_parameters()}
        return {n for n, _ in model.named_parameters(remove_duplicate=False)} - kept
