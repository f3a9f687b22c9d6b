"""DeepSpeed config generated from our config (users never hand-write a second, conflicting one)."""

from __future__ import annotations

import math
from typing import Any

from sdft_ray.config import Config

REDUCE_BUCKET = int(5e8)  # elements per ZeRO reduce bucket (sdft-ray memory counts two of them)


def samples_per_step(cfg: Config) -> int:
    """Sequences per optimizer step, all trainer ranks together."""
    return cfg.train.batch_size * (cfg.rollout.num_rollouts if cfg.train.algo == "sdft" else 1)


def grad_accum_steps(cfg: Config) -> int:
    return samples_per_step(cfg) // (cfg.train.micro_batch_size * cfg.train.num_trainers)


def deepspeed_config(cfg: Config, bf16: bool) -> dict[str, Any]:
    t = cfg.train
    zero: dict[str, Any] = {
        "stage": t.zero_stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": REDUCE_BUCKET,
    }
    if t.zero_stage == 3:
        zero.update(
            {
                "stage3_param_persistence_threshold": int(1e5),
                "stage3_prefetch_bucket_size": int(5e8),
                # save_pretrained needs the full 16-bit weights gathered on rank 0
                "stage3_gather_16bit_weights_on_model_save": True,
            }
        )
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg),
        "train_batch_size": samples_per_step(cfg),
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.offload_optimizer:
        # ZeRO-Offload steps the optimizer on CPU with DeepSpeed's own CPU Adam.
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.adam_betas), "weight_decay": t.weight_decay},
        }
    return out


def lr_lambda(cfg: Config, total_steps: int):  # noqa: ANN201 - returns a plain callable for LambdaLR
    """Linear warmup over warmup_ratio of the run, then cosine to 0 (or constant).

    Counted as HF's get_cosine_schedule_with_warmup (the official code's): step 0 has lr 0, warmup steps are
    ceil(warmup_ratio * total).
    """
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_steps))

    def f(step: int) -> float:
        if warmup and step < warmup:
            return step / warmup
        if cfg.train.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def zero3_partitioned(module: Any) -> bool:
    """The module's parameters are ZeRO-3 partitions (DeepSpeed tags each one with ``ds_id``)."""
    first = next(iter(module.parameters()), None)
    return first is not None and hasattr(first, "ds_id")
