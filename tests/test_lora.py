"""LoRA SDFT (``model.lora.rank`` > 0, peft): the EMA teacher is an adapter on the student's own frozen base,
the engines receive merged weights, checkpoints hold PEFT adapters and resume bit-identically."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import ray
import torch
from conftest import BACKENDS, tiny_overrides, toy_samples

from sdft_ray.config import load_config

LORA = {"model__lora__rank": 4, "model__lora__alpha": 8}


def test_ema_teacher_is_base_plus_ema_adapter(tiny, tmp_path: Path) -> None:
    """The teacher's logits equal those of a merged model built from the base and the EMA adapter the spec's
    formula gives; scoring with it leaves the student's adapter, its trainability and its logits untouched."""
    import peft

    from actors.teacher import TeacherScorer
    from sdft_ray import lora
    from sdft_ray.modeling import completion_logits, load_model

    cfg = load_config(None, tiny_overrides(tiny, tmp_path, **LORA))
    base = load_model(cfg.model, torch.device("cpu"))
    reference_base = copy.deepcopy(base)
    pm = lora.wrap(base, cfg.model.lora, ema_teacher=True)
    student = lora.adapter_params(lora.hf_model(pm), lora.STUDENT)
    start = {n: p.detach().clone() for n, p in student}
    with torch.no_grad():  # a student that has trained: B is no longer zero, so the adapter matters
        for _, p in student:
            p.add_(torch.randn_like(p) * 0.5)
    teacher = TeacherScorer(cfg, torch.device("cpu"), student=pm)
    rate = 0.25
    teacher.ema_update([(lora.teacher_name(n), p.detach()) for n, p in student], rate)
    flags = {n: p.requires_grad for n, p in pm.named_parameters()}
    items = toy_samples()
    prompts, comps = [s.teacher_prompt_ids for s in items], [s.completion_ids for s in items]
    student_before = completion_logits(lora.hf_model(pm), prompts, comps, teacher.pad).detach()
    got = teacher.logits(prompts, comps)

    ref = peft.get_peft_model(reference_base, copy.deepcopy(pm.peft_config[lora.STUDENT]))
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for n, p in student:
            ema = (1 - rate) * start[n] + rate * p.detach()  # the EMA adapter, by the formula
            ref_params[f"base_model.model.{n}"].copy_(ema)
    merged = ref.merge_and_unload().eval()
    want = completion_logits(merged, prompts, comps, teacher.pad).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in pm.named_parameters()} == flags  # nothing became (un)trainable
    assert sum(flags.values()) == len(student)  # only the student's adapter trains
    torch.testing.assert_close(completion_logits(lora.hf_model(pm), prompts, comps, teacher.pad), student_before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_sdft_engines_get_merged_weights(tiny, ray_cluster, tmp_path: Path, backend) -> None:
    """Every sync is proven by checksum, the engine's log-probs equal the trainer's recompute (so it samples from
    base + adapter), only the adapter trains, and the checkpoint's adapter merges into its student/ weights."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sdft_ray.driver import SDFTDriver

    over = tiny_overrides(
        tiny,
        tmp_path,
        rollout__backend=backend,
        train__steps=4,
        train__lr_scheduler="constant",
        train__warmup_ratio=0,
        train__lr=3e-2,
        pipeline__verify_weight_checksums=True,
        **LORA,
    )
    d = SDFTDriver(load_config(None, over))
    try:
        summary = d.run()
    finally:
        d.shutdown()
    rows = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert summary["weights_verified"] == 5  # the base, then one sync per step
    # on-policy: engine and trainer score the same tokens with the same (merged) weights
    assert all(r["logprob_gap"] < 1e-3 for r in rows), [r["logprob_gap"] for r in rows]
    step = tmp_path / "checkpoints" / "step-000004"
    merged = load_file(str(step / "student" / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny["model"])
    base_sd = base.state_dict()
    moved = [k for k in merged if not torch.equal(merged[k], base_sd[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # adapted linears only; norms, embeddings stay
    rebuilt = PeftModel.from_pretrained(base, str(step / "adapter")).merge_and_unload().state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(rebuilt[k], v, rtol=1e-5, atol=1e-6)
    assert (step / "adapter" / "ema" / "adapter_model.safetensors").is_file()  # the EMA teacher's adapter
    from sdft_ray.cli import main

    assert main(["export", str(step), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    exported = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert exported.keys() == merged.keys()
    for k, v in merged.items():
        torch.testing.assert_close(exported[k], v, rtol=1e-5, atol=1e-6)
    assert main(["export", str(step), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "adapter" / "ema").exists()


def test_lora_resume_is_bit_identical(tiny, ray_cluster, tmp_path: Path) -> None:
    """Train 2 steps, checkpoint, train a 3rd; a fresh trainer loaded from the checkpoint takes the same 3rd
    step to the same bits (adapter, Adam state and EMA adapter all restored)."""
    from actors.trainer import StudentTrainer

    cfg = load_config(None, tiny_overrides(tiny, tmp_path, train__warmup_ratio=0, **LORA)).to_dict()
    batch = [ray.put(toy_samples())]
    a = ray.remote(StudentTrainer).options(num_cpus=0.5).remote(cfg, 6)
    b = ray.remote(StudentTrainer).options(num_cpus=0.5).remote(cfg, 6)
    try:
        for _ in range(2):
            ray.get(a.train_step.remote(batch))
        ray.get(a.save.remote(str(tmp_path / "ckpt")))
        assert ray.get(b.load.remote(str(tmp_path / "ckpt"))) == 2
        ra, rb = ray.get([a.train_step.remote(batch), b.train_step.remote(batch)])
        assert ra.loss == rb.loss
        for which in ("student", "teacher"):
            wa, wb = ray.get([a.state_dict_cpu.remote(which), b.state_dict_cpu.remote(which)])
            assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which
    finally:
        ray.kill(a)
        ray.kill(b)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_lora_sft_trains(tiny, ray_cluster, tmp_path: Path, zero_stage: int) -> None:
    """Against a control run at lr ~0 on the same batches (the sampler is seeded), training the adapter lowers the
    loss of each later batch: paired per step, so batch-to-batch noise cancels."""
    from sdft_ray.driver import SDFTDriver

    def losses(lr: float) -> list[float]:
        out = tmp_path / f"lr{lr}"
        over = tiny_overrides(
            tiny,
            out,
            train__algo="sft",
            train__steps=8,
            train__lr_scheduler="constant",
            train__warmup_ratio=0,
            train__lr=lr,
            train__zero_stage=zero_stage,
            **LORA,
        )
        d = SDFTDriver(load_config(None, over))
        try:
            d.run()
        finally:
            d.shutdown()
        rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return [r["loss"] for r in rows if "loss" in r]

    trained, control = losses(3e-2), losses(1e-12)  # lr must be > 0; 1e-12 moves nothing measurable
    assert trained[0] == pytest.approx(control[0])  # the same first batch, before any update
    gains = [c - t for t, c in zip(trained[4:], control[4:], strict=True)]
    assert min(gains) > 0.05, (trained, control)
