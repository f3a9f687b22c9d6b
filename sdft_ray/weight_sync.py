"""Bucketed weight transfer from the trainer to rollout engines and separate teachers.

Parameters travel in buckets of ``pipeline.sync_bucket_mb`` (one object / one collective per bucket, never one
RPC per tensor). Under ZeRO-3 each bucket's parameters are gathered together, then released.
On CPU the transport is the Ray object store; on GPUs see ``actors/vllm_engine.py`` (CUDA IPC / NCCL).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from sdft_ray.errors import WeightSyncError

# One bucket's layout for the GPU transports: (name, dtype name, shape). Strings, not torch.dtype: the
# metadata must survive any serialization hop into a vLLM worker (msgpack, pickle).
Meta = list[tuple[str, str, tuple[int, ...]]]


@dataclass
class Bucket:
    names: list[str]
    tensors: list[torch.Tensor]
    checksum: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


def tensor_digest(t: torch.Tensor, h: Any) -> None:
    flat = t.detach().contiguous().reshape(-1)
    h.update(str(t.dtype).encode())
    h.update(str(tuple(t.shape)).encode())
    if flat.numel():
        h.update(flat.cpu().view(torch.uint8).numpy().tobytes())


def bucket_checksum(names: list[str], tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha1()
    for n, t in zip(names, tensors, strict=True):
        h.update(n.encode())
        tensor_digest(t, h)
    return h.hexdigest()


def tensor_digests(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """Per-tensor digests (name -> sha1 of dtype, shape, bytes); a receiver can build them bucket by bucket."""
    out = {}
    for n, t in named:
        h = hashlib.sha1()
        tensor_digest(t, h)
        out[n] = h.hexdigest()
    return out


def combine_digests(digests: dict[str, str]) -> str:
    """One checksum from per-tensor digests, independent of the order the tensors arrived in."""
    h = hashlib.sha1()
    for n in sorted(digests):
        h.update(n.encode())
        h.update(digests[n].encode())
    return h.hexdigest()


def model_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Order-independent digest of named tensors (for tests: rollout weights == trainer weights)."""
    return combine_digests(tensor_digests(named))


def _gathered(params: list[torch.nn.Parameter], zero_stage: int) -> Any:
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def iter_param_buckets(
    module: torch.nn.Module,
    bucket_bytes: int,
    zero_stage: int = 0,
    dtype: torch.dtype | None = None,
    to_cpu: bool = True,
) -> Iterator[Bucket]:
    """Yield the module's parameters as buckets of full (gathered) tensors, copied out of the training graph.

    Must be called on every trainer rank under ZeRO-3 (the gather is collective); ranks > 0 may drop the
    buckets. Tied parameters appear once, under their first name.
    """
    named = list(module.named_parameters())

    def size(p: torch.nn.Parameter) -> int:
        numel = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        return numel * (torch.empty((), dtype=dtype).element_size() if dtype else p.element_size())

    group: list[tuple[str, torch.nn.Parameter]] = []
    total = 0
    for item in [*named, None]:
        if item is not None and (not group or total + size(item[1]) <= bucket_bytes):
            group.append(item)
            total += size(item[1])
            continue
        if group:
            with _gathered([p for _, p in group], zero_stage):
                tensors = []
                for _, p in group:
                    t = p.detach()
                    t = t.to(dtype) if dtype is not None else t
                    tensors.append(t.to("cpu", copy=True) if to_cpu else t.clone())
            yield Bucket([n for n, _ in group], tensors)
        if item is not None:
            group, total = [item], size(item[1])


def load_bucket_into(module: torch.nn.Module, bucket: Bucket, verify: bool = False) -> None:
    """Copy a bucket into a plain (non-ZeRO) module, checking names and shapes."""
    if verify and bucket.checksum and bucket_checksum(bucket.names, bucket.tensors) != bucket.checksum:
        raise WeightSyncError(f"checksum mismatch in bucket starting with {bucket.names[0]!r}")
    params = dict(module.named_parameters())
    for name, t in zip(bucket.names, bucket.tensors, strict=True):
        p = params.get(name)
        if p is None:
            raise WeightSyncError(f"received weight {name!r} that the receiving model does not have")
        if p.shape != t.shape:
            raise WeightSyncError(f"weight {name!r}: shape {tuple(t.shape)} != receiver's {tuple(p.shape)}")
        with torch.no_grad():
            p.copy_(t.to(p.device, p.dtype))


def receive_buckets(refs: list[Any], load: Callable[[Bucket], None], timeout_s: float, who: str) -> None:
    """Fetch bucket ObjectRefs (or buckets passed inline) and load each; a late bucket is a loud error."""
    import ray

    for ref in refs:
        try:
            bucket = ray.get(ref, timeout=timeout_s) if isinstance(ref, ray.ObjectRef) else ref
        except ray.exceptions.GetTimeoutError:
            raise WeightSyncError(f"{who}: weight bucket did not arrive within {timeout_s}s") from None
        load(bucket)
