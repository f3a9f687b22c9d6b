"""The rules of a config that join its sections (each section checks its own fields beside its definition in
``config.py``): batch shapes against the trainers, LoRA against ZeRO and teacher models, teacher placement
against the estimator, the weight transport against the devices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdft_ray.config_parse import non_finite
from sdft_ray.errors import ConfigError

if TYPE_CHECKING:
    from sdft_ray.config import Config


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_config(cfg: Config) -> None:
    """Every rule of a config: each section's own (its ``check`` beside its fields), then those that join
    sections. The first one broken raises ``ConfigError`` naming the key."""
    bad = non_finite(cfg)
    if bad:
        raise ConfigError(f"{bad}: must be a finite number")
    cfg.model.check()
    need(
        bool(cfg.data.train) or bool(cfg.continual.stages),
        "data.train is required (json/jsonl/parquet file, save_to_disk folder or hub name)",
    )
    for section in (cfg.train, cfg.logging, cfg.teacher, cfg.loss, cfg.rollout, cfg.pipeline):
        section.check()
    cfg.eval.check()
    cfg.continual.check()
    t, lo, r, te = cfg.train, cfg.loss, cfg.rollout, cfg.teacher
    per_rank = t.batch_size * (r.num_rollouts if t.algo == "sdft" else 1)
    need(
        per_rank % (t.micro_batch_size * t.num_trainers) == 0,
        f"train.batch_size ({t.batch_size}) x rollout.num_rollouts ({r.num_rollouts}) must be divisible by "
        f"train.micro_batch_size ({t.micro_batch_size}) x train.num_trainers ({t.num_trainers})",
    )
    if cfg.model.lora.rank:
        need(
            t.zero_stage < 3,
            "model.lora needs train.zero_stage 0-2: ZeRO-3 would partition a base that never "
            "trains, and the adapter is too small to need it",
        )
        need(
            not te.model_path,
            "model.lora with teacher.model_path: the LoRA teacher is the student's own base "
            "plus an adapter; a teacher model of its own needs full fine-tuning",
        )
    if te.kind == "external":
        need(lo.estimator == "topk", "teacher.kind=external only returns top-k logprobs: use loss.estimator=topk")
    if cfg.teacher_colocated is False and lo.estimator == "topk":
        need(lo.topk_support == "teacher", "loss.topk_support=student needs the teacher colocated with the trainer")
    if lo.estimator == "full" and te.placement == "separate":
        raise ConfigError(
            "loss.estimator=full with teacher.placement=separate would ship seq x vocab tensors between actors; "
            "use teacher.placement=colocated (or auto) or loss.estimator=topk"
        )
    _check_transport(cfg)
    need(
        t.algo != "sdft" or r.temperature == 1.0,
        f"rollout.temperature={r.temperature}: SDFT scores rollouts at temperature 1 (student, teacher and "
        "importance weight); official and TRL divide all logits by T instead, which sdft-ray does not "
        "implement yet",
    )


def _check_transport(cfg: Config) -> None:
    t, r, kind = cfg.train, cfg.rollout, cfg.weight_transport
    if kind in ("nccl", "ipc"):
        need(r.backend == "vllm", f"pipeline.weight_transport={kind} needs rollout.backend=vllm")
    if kind == "ipc":
        need(
            r.num_gpus > 0 and t.num_gpus > 0,
            "pipeline.weight_transport=ipc moves CUDA tensors: set rollout.num_gpus and train.num_gpus, or use "
            "object_store on CPU",
        )
        # only trainer rank 0's CUDA memory handles are shipped, and they open only on that GPU
        need(
            r.num_engines == 1 and r.tensor_parallel_size == 1,
            "pipeline.weight_transport=ipc shares trainer 0's GPU with one engine: rollout.num_engines and "
            "rollout.tensor_parallel_size must be 1 (more engines: whole GPUs and nccl)",
        )
        need(
            r.num_gpus + t.num_gpus <= 1,
            f"pipeline.weight_transport=ipc puts the engine on trainer 0's GPU: rollout.num_gpus "
            f"({r.num_gpus:g}) + train.num_gpus ({t.num_gpus:g}) must be <= 1",
        )
    if kind == "nccl":
        # on CPU (no GPU on either side) the same broadcast group runs over gloo
        need(
            (r.num_gpus >= 1 and t.num_gpus >= 1) or (r.num_gpus == 0 and t.num_gpus == 0),
            "pipeline.weight_transport=nccl needs whole GPUs per trainer and engine (NCCL cannot put two ranks "
            "on one GPU; a shared GPU uses ipc), or no GPU on either side (then it runs over gloo)",
        )
