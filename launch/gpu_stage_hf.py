"""GPU proof, stage 1 (no vLLM): Ray + DeepSpeed on one GPU with transformers rollouts, at Qwen2.5-0.5B's shape.

    python launch/gpu_stage_hf.py --site-tar .gpu/site.tar.xz --shape .gpu/shape --out $OUT

The GPU machine has no network and no Ray or DeepSpeed: ``--site-tar`` is those packages unpacked for its
Python (built by ``launch/gpu_pack.sh MODEL_DIR``). The model is Qwen2.5-Coder-0.5B-Instruct's config and tokenizer with
seeded random weights: the fetched weights (a 491 MB GGUF) would take eight 64 MiB transfers, and memory,
speed and the numerics checked here depend on the shape, not on the values. Checks, each reported even if
another fails (``report.json`` is rewritten after each):

1. ``loss_numerics``: one batch's full-vocabulary SDFT loss (chunked, forward KL) and every gradient in bf16 on
   the GPU against fp32 on the CPU, the same weights and tokens;
2. ``zero0_bf16`` / ``zero2_bf16`` / ``zero3_bf16``: SDFT through the real driver (HF rollouts on the GPU, EMA
   teacher with its fp32 master, checksum-verified object-store sync), seconds per step, peak GPU memory per
   role beside ``sdft-ray memory``'s estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unpack_site(tar: str, dest: str = "/tmp/sdft_site") -> None:
    """The carried packages, importable here and in every Ray worker (workers inherit PYTHONPATH)."""
    if not Path(dest, "ray").is_dir():
        Path(dest).mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-xJf", tar, "-C", dest], check=True)
    sys.path.insert(0, dest)
    os.environ["PYTHONPATH"] = os.pathsep.join([dest, str(ROOT), os.environ.get("PYTHONPATH", "")])


def random_model(shape_dir: str, out: Path) -> str:
    """A save_pretrained folder with ``shape_dir``'s config and tokenizer and weights drawn with seed 0."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (out / "config.json").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(shape_dir), dtype=torch.float32)
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out)
    return str(out)


def loss_and_grads(model_path: str, batch: list[Any], device: str, dtype: Any) -> tuple[float, dict[str, Any]]:
    """The SDFT loss the trainer computes (chunked full vocabulary, forward KL, skip 3) and its gradients."""
    import torch

    from sdft_ray.config import ModelConfig
    from sdft_ray.losses import chunked_sdft_loss
    from sdft_ray.modeling import completion_hidden, lm_head, load_model, pad_right

    cfg = ModelConfig(path=model_path, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    student = load_model(cfg, torch.device(device)).train()
    teacher = load_model(cfg, torch.device(device)).eval().requires_grad_(False)
    comps = [b.demonstration_ids for b in batch]
    pad = 0
    with torch.no_grad():
        t_hidden = completion_hidden(teacher, [b.teacher_prompt_ids for b in batch], comps, pad)
    s_hidden = completion_hidden(student, [b.prompt_ids for b in batch], comps, pad)
    ids, mask = pad_right(comps, pad)
    out = chunked_sdft_loss(
        s_hidden,
        t_hidden,
        lambda h: lm_head(student, h),
        lambda h: lm_head(teacher, h),
        ids.to(device),
        mask.to(device),
        chunk_tokens=256,
    )
    out.loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in student.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), grads


def check_loss_numerics(model_path: str, data_file: str) -> dict[str, Any]:
    import torch

    from sdft_ray.config import DataConfig, ModelConfig
    from sdft_ray.data import load_examples, tokenize_examples
    from sdft_ray.modeling import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=model_path))
    dcfg = DataConfig(train=data_file, max_prompt_length=512)
    batch = tokenize_examples(load_examples(dcfg)[:4], tok, dcfg)
    torch.set_num_threads(min(16, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ref_loss, ref = loss_and_grads(model_path, batch, "cpu", torch.float32)
    cpu_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    gpu_loss, got = loss_and_grads(model_path, batch, "cuda", torch.bfloat16)
    gpu_s = time.perf_counter() - t0
    cos = {n: float(torch.nn.functional.cosine_similarity(ref[n].flatten(), got[n].flatten(), dim=0)) for n in ref}
    norm = lambda g: float(torch.sqrt(sum((x.double() ** 2).sum() for x in g.values())))
    worst = sorted(cos.items(), key=lambda kv: kv[1])[:3]
    rel = abs(gpu_loss - ref_loss) / max(abs(ref_loss), 1e-12)
    return {
        # bf16 keeps 8 bits of mantissa: a few 1e-3 relative on a loss summed over thousands of tokens
        "ok": rel < 2e-2 and min(cos.values()) > 0.98,
        "loss_fp32_cpu": ref_loss,
        "loss_bf16_gpu": gpu_loss,
        "loss_rel_diff": rel,
        "grad_norm_fp32_cpu": norm(ref),
        "grad_norm_bf16_gpu": norm(got),
        "grad_cosine_min": min(cos.values()),
        "grad_cosine_median": sorted(cos.values())[len(cos) // 2],
        "grad_cosine_worst": worst,
        "tokens": sum(len(b.demonstration_ids) for b in batch),
        "cpu_fp32_s": cpu_s,
        "gpu_bf16_s": gpu_s,
    }


def predicted_gb(overrides: list[str]) -> dict[str, float]:
    """``sdft-ray memory``'s GPU totals for the same config."""
    from sdft_ray.config import load_config
    from sdft_ray.tools import memory_budget as mb

    cfg = load_config(None, overrides)
    shape = mb.ModelShape.from_hf_config(mb.model_config(cfg.model.path)[0], cfg.model.lora)
    return {k: round(v, 2) for k, v in mb.summary(mb.budget(cfg, shape)).items()}


def run_sdft(overrides: list[str], steps: int) -> dict[str, Any]:
    import ray

    from sdft_ray.cluster import init_ray
    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver

    init_ray()
    cfg = load_config(None, [*overrides, f"train.steps={steps}", "train.overwrite=true", "logging.progress_bar=false"])
    d = SDFTDriver(cfg)
    try:
        summary = d.run()
        peaks = {"trainer": ray.get(d.actors.trainers[0].peak_memory.remote())}
        if d.actors.rollouts is not None:
            peaks["rollout"] = ray.get(d.actors.rollouts.actors[0].peak_memory.remote())
    finally:
        d.shutdown()
    rows = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in rows if "loss" in r]
    keys = ("step_s", "train_s", "teacher_s", "rollout_s", "ema_s", "weight_sync_s", "loss", "grad_norm")
    return {
        "ok": summary.get("weights_verified", 0) >= steps and all(r.get("skipped_step", 0) == 0 for r in steps_),
        "steps": [{k: r.get(k) for k in keys} for r in steps_],
        "peak_gpu_gb": {k: v.get("cuda_mb", 0) / 1024 for k, v in peaks.items()},
        "peak_rss_gb": {k: v["rss_mb"] / 1024 for k, v in peaks.items()},
        "predicted_gpu_gb": predicted_gb(overrides),
        "weights_verified": summary.get("weights_verified"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--site-tar", help="Ray, DeepSpeed and their needs, unpacked for this Python (tar.xz)")
    ap.add_argument("--shape", required=True, help="folder with the model's config.json and tokenizer")
    ap.add_argument("--out", default="gpu_stage_hf")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", nargs="*", help="run only these checks")
    a = ap.parse_args()
    if a.site_tar:
        unpack_site(a.site_tar)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from sdft_ray.tools.bench import machine_info
    from sdft_ray.tools.tasks import make_tasks

    report: dict[str, Any] = {"machine": machine_info(), "checks": {}}
    work = Path("/tmp/sdft_gpu_stage_hf")
    model = random_model(a.shape, work / "model")
    data = make_tasks(work / "data")["tool_use_train"]
    base = [
        f"model.path={model}",
        f"data.train={data}",
        "data.max_prompt_length=512",
        "model.dtype=auto",  # bf16 on a GPU
        "rollout.backend=hf",
        "rollout.num_gpus=0.3",
        "rollout.max_new_tokens=128",
        "train.num_gpus=0.7",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=2e-5",
        "pipeline.verify_weight_checksums=true",
        "train.save_every=0",
        "logging.wandb=disabled",
    ]
    checks = {
        "loss_numerics": lambda: check_loss_numerics(model, data),
        "zero0_bf16": lambda: run_sdft([*base, "train.zero_stage=0", f"train.output_dir={work / 'z0'}"], a.steps),
        "zero2_bf16": lambda: run_sdft([*base, "train.zero_stage=2", f"train.output_dir={work / 'z2'}"], a.steps),
        "zero3_bf16": lambda: run_sdft([*base, "train.zero_stage=3", f"train.output_dir={work / 'z3'}"], a.steps),
    }
    for name, fn in checks.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception:
            res = {"ok": False, "error": traceback.format_exc()[-4000:]}
        res["wall_s"] = time.perf_counter() - t0
        report["checks"][name] = res
        print(f"== {name}: {json.dumps(res, default=str)[:3000]}", flush=True)
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(r.get("ok") for r in report["checks"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    sys.exit(main())
