"""LoRA through peft: the one adapter for peft's API (tested with peft 0.21).

The student is the base model with a trainable adapter ("default"); the EMA teacher is the same frozen base
with a second adapter ("ema") that follows the student's, so the teacher costs the adapter's size, not a
second model. A frozen teacher is the base with adapters disabled; a live one is the student's adapter.
Rollout engines receive merged weights (W + scale * B @ A, computed one bucket at a time under HF names), so
any engine that loads a full model takes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from sdft_ray.config import LoraSettings

STUDENT, TEACHER = "default", "ema"


def wrap(model: torch.nn.Module, lora: LoraSettings, ema_teacher: bool) -> Any:
    """The student as a ``PeftModel``; with ``ema_teacher`` a second adapter starting equal to the student's."""
    import peft

    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(model, config)
    if ema_teacher:
        pm.add_adapter(TEACHER, config)
        params = dict(pm.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if f".{TEACHER}." in name:
                    p.copy_(params[name.replace(f".{TEACHER}.", f".{STUDENT}.")])
                    p.requires_grad_(False)
        pm.set_adapter(STUDENT)
    return pm


def hf_model(pm: Any) -> torch.nn.Module:
    """The transformers model inside (its layers carry the adapters): what the forward helpers call."""
    return pm.base_model.model


@contextmanager
def active(pm: Any, adapter: str | None) -> Iterator[None]:
    """Run forwards with ``adapter`` (None: the base alone), then give the student's back.

    peft's ``set_adapter`` also makes the adapter it activates trainable; the flags are put back as they were,
    so the optimizer's view of what trains never changes."""
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    try:
        if adapter is None:
            with pm.disable_adapter():
                yield
        else:
            pm.base_model.set_adapter(adapter)
            yield
    finally:
        pm.base_model.set_adapter(STUDENT)
        for n, p in pm.named_parameters():
            p.requires_grad_(flags[n])


def adapter_params(module: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if f".{adapter}." in n and ".lora_" in n]


def teacher_name(student_name: str) -> str:
    return student_name.replace(f".{STUDENT}.", f".{TEACHER}.")


def _lora_layers(module: torch.nn.Module) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def merged_names(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The model's parameters under the names of the plain model (``q_proj.base_layer.weight`` ->
    ``q_proj.weight``), adapters left out; the base tensor stands for the merged one (same size)."""
    prefix = "base_model.model."
    out = []
    for name, p in module.named_parameters():
        if ".lora_" in name:
            continue
        out.append((name.removeprefix(prefix).replace(".base_layer.", "."), p))
    return out


class Merger:
    """Per parameter name: the merged tensor W + delta for adapted layers, the base tensor for the rest."""

    def __init__(self, module: torch.nn.Module, adapter: str = STUDENT) -> None:
        prefix = "base_model.model."
        self.adapter = adapter
        self.layers = {f"{n.removeprefix(prefix)}.weight": m for n, m in _lora_layers(module).items()}

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        layer = self.layers.get(name)
        if layer is None or self.adapter not in layer.lora_A:
            return tensor
        with torch.no_grad():
            # W + scale * B @ A as one addmm in the weight's dtype: peft's get_delta_weight casts a bf16 adapter to
            # fp32 on CPU and returns a full-size fp32 delta, rounded, then added and rounded again; at 1.5B that
            # is ~5 GB of temporaries per sync. For an adapter in the weight's dtype, addmm accumulates
            # in fp32 and rounds once (docs/benchmarks.md).
            a, b = layer.lora_A[self.adapter].weight, layer.lora_B[self.adapter].weight
            if a.dtype != tensor.dtype:  # a wider adapter (fp32 on a bf16 base) keeps its precision until the sum
                return tensor + layer.get_delta_weight(self.adapter).to(tensor.dtype)
            scale = layer.scaling[self.adapter]
            if layer.fan_in_fan_out:  # Conv1D layers (GPT-2) hold their weight as (in, out)
                return torch.addmm(tensor, a.t(), b.t(), alpha=scale)
            return torch.addmm(tensor, b, a, alpha=scale)


def export(checkpoint: str, out: str, merge: bool) -> dict[str, str]:
    """A checkpoint's LoRA student as a PEFT adapter folder, or (``merge``) as a plain HF model built from the
    run's base model and the adapter."""
    import shutil
    from pathlib import Path

    from sdft_ray.checkpoint import read_driver_state
    from sdft_ray.errors import CheckpointError

    root = Path(checkpoint)
    adapter = root / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{root}: no adapter/ (not a checkpoint of a model.lora run)")
    if not merge:
        shutil.copytree(adapter, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns(TEACHER))
        return {"adapter": out}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = read_driver_state(root)["config"]["model"]["path"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(root / "student").save_pretrained(out)
    return {"model": out, "base": base_path}
