"""vLLM rollout backend and GPU weight transports (CUDA IPC when colocated, NCCL across GPUs/nodes).

Imported only when ``rollout.backend=vllm``: nothing here runs on a CPU machine. Built on vLLM APIs that have
been stable from 0.8 through 0.3x: ``LLM(worker_extension_cls=...)`` + ``collective_rpc`` to run our receiver
inside every vLLM worker, ``StatelessProcessGroup`` + ``PyNcclCommunicator`` for a trainer<->engine NCCL
group that does not touch either side's global process group, and ``sleep``/``wake_up`` for colocation.

Protocol per sync, bucket by bucket (``pipeline.sync_bucket_mb``):
  trainer: gather bucket (ZeRO-3) -> pack into one flat buffer per dtype -> broadcast / share IPC handle
  engines: receive the flat buffer -> split -> ``model.load_weights`` (vLLM maps HF names, fuses qkv etc.)
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from sdft_ray.config import Config
from sdft_ray.weight_sync import Bucket, WeightSyncError

_ALIGN = 16  # every tensor starts at a 16-byte offset so any dtype can be viewed out of the byte buffer


def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat byte buffer for a bucket: one collective / one IPC handle per bucket, not per tensor."""
    parts = []
    for t in tensors:
        b = t.contiguous().reshape(-1).view(torch.uint8)
        parts.append(b)
        if _padded(b.numel()) > b.numel():
            parts.append(torch.zeros(_padded(b.numel()) - b.numel(), dtype=torch.uint8, device=b.device))
    return torch.cat(parts)


def unpack(flat: torch.Tensor, meta: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, dtype, shape in meta:
        n = _nbytes(dtype, shape)
        out.append((name, flat[offset : offset + n].view(dtype).reshape(shape)))
        offset += _padded(n)
    return out


def plan_nbytes(meta: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> int:
    return sum(_padded(_nbytes(dt, shape)) for _, dt, shape in meta)


def bucket_meta(bucket: Bucket) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    return [(n, t.dtype, tuple(t.shape)) for n, t in zip(bucket.names, bucket.tensors, strict=True)]


def stateless_nccl_group(host: str, port: int, rank: int, world_size: int, device: torch.device) -> Any:
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
    return PyNcclCommunicator(pg, device=device)


class WeightReceiver:
    """Mixed into every vLLM worker (``worker_extension_cls``); methods are called via ``collective_rpc``."""

    def sdft_init_nccl(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        from vllm.distributed.parallel_state import get_world_group

        rank = get_world_group().rank + rank_offset
        self._sdft_group = stateless_nccl_group(host, port, rank, world_size, self.device)
        self._sdft_digest = hashlib.sha1()

    def sdft_recv_nccl(self, meta: list[tuple[str, torch.dtype, tuple[int, ...]]], nbytes: int) -> None:
        flat = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self._sdft_group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
        self._sdft_load(unpack(flat, meta))

    def sdft_recv_ipc(self, handles: dict[str, Any], meta: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        # handles are keyed by the physical GPU uuid so each TP worker opens the one on its own device
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        func, args = handles[uuid]
        assert func is rebuild_cuda_tensor, "unexpected IPC handle"
        args = list(args)
        args[6] = self.device.index  # the sender's device index means nothing in this process
        flat = func(*args)
        self._sdft_load(unpack(flat, meta))
        torch.cuda.synchronize()

    def sdft_load_cpu(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self._sdft_load([(n, t.to(self.device)) for n, t in named])

    def _sdft_load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.model_runner.model.load_weights(weights=named)
        if getattr(self, "_sdft_digest", None) is None:
            self._sdft_digest = hashlib.sha1()
        for n, t in named:  # digest of what arrived, comparable with the sender's bucket checksums
            self._sdft_digest.update(n.encode())
            self._sdft_digest.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())

    def sdft_received_digest(self, reset: bool = True) -> str:
        d = getattr(self, "_sdft_digest", None)
        out = d.hexdigest() if d is not None else ""
        if reset:
            self._sdft_digest = hashlib.sha1()
        return out


class VLLMGenerator:
    """A vLLM ``LLM`` engine behind the same interface as ``HFGenerator``."""

    def __init__(self, cfg: Config, engine_index: int) -> None:
        try:
            from vllm import LLM
        except ImportError as e:  # the CPU install has no vLLM on purpose
            raise RuntimeError("rollout.backend=vllm needs the GPU extra: pip install 'sdft-ray[gpu]'") from e
        r = cfg.rollout
        self.cfg = cfg
        dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
        self.llm = LLM(
            model=cfg.model.path,
            tokenizer=cfg.model.tokenizer or cfg.model.path,
            dtype=dtype,
            tensor_parallel_size=r.tensor_parallel_size,
            distributed_executor_backend="ray" if r.tensor_parallel_size > 1 else None,
            gpu_memory_utilization=r.gpu_memory_utilization,
            enable_sleep_mode=r.enable_sleep_mode,
            enforce_eager=r.enforce_eager,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.train.seed + engine_index,
            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens,
            worker_extension_cls="actors.vllm_engine.WeightReceiver",
        )
        self.asleep: set[str] = set()

    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        greedy: bool,
        seed: int,
    ) -> list[tuple[list[int], list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake(("weights", "kv_cache"))
        params = SamplingParams(
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            max_tokens=max_new_tokens,
            logprobs=0,  # the sampled token's logprob, for the importance correction
            seed=seed,
        )
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            toks = list(c.token_ids)
            lps = [float(step[t].logprob) for t, step in zip(toks, c.logprobs or [], strict=False)]
            results.append((toks, lps))
        return results

    # -- weights
    def load_bucket(self, bucket: Bucket, verify: bool) -> None:
        self.llm.collective_rpc("sdft_load_cpu", args=(list(zip(bucket.names, bucket.tensors, strict=True)),))

    def init_nccl(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        self.llm.collective_rpc("sdft_init_nccl", args=(host, port, rank_offset, world_size))

    def recv_nccl(self, meta: list[tuple[str, torch.dtype, tuple[int, ...]]], nbytes: int) -> None:
        self.llm.collective_rpc("sdft_recv_nccl", args=(meta, nbytes))

    def recv_ipc(self, handles: dict[str, Any], meta: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None:
        self.llm.collective_rpc("sdft_recv_ipc", args=(handles, meta))

    def checksum(self) -> str:
        digests = self.llm.collective_rpc("sdft_received_digest", args=(False,))
        if len(set(digests)) > 1 and self.cfg.rollout.tensor_parallel_size == 1:
            raise WeightSyncError(f"vLLM workers received different weights: {digests}")
        return digests[0]

    # -- colocation: free GPU memory while the trainer runs
    def sleep(self) -> None:
        if self.cfg.rollout.enable_sleep_mode and not self.asleep:
            self.llm.sleep(level=1)  # level 1: weights offloaded to CPU RAM, KV cache dropped
            self.asleep = {"weights", "kv_cache"}

    def wake(self, tags: tuple[str, ...] = ("weights",)) -> None:
        """Weights before a sync (it writes into them), the KV cache only before generation."""
        for tag in ("weights", "kv_cache"):
            if tag in tags and tag in self.asleep:
                self.llm.wake_up(tags=[tag])
                self.asleep.discard(tag)


class TrainerSender:
    """Trainer-side half of the GPU transports (lives inside ``StudentTrainer`` rank 0)."""

    def __init__(self) -> None:
        self.group: Any = None

    def init_nccl(self, host: str, port: int, world_size: int) -> None:
        self.group = stateless_nccl_group(host, port, 0, world_size, torch.device("cuda", torch.cuda.current_device()))

    def send_nccl(self, bucket: Bucket) -> None:
        flat = pack(bucket.tensors)
        self.group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()

    @staticmethod
    def ipc_handles(flat: torch.Tensor) -> dict[str, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
        return {uuid: reduce_tensor(flat)}
