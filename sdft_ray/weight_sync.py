"""Weights in buckets: the one bucket plan, gathering, checksums, loading, and the GPU wire format.

Parameters travel in buckets of ``pipeline.sync_bucket_mb`` (one object / one collective per bucket, never one
RPC per tensor). Under ZeRO-3 each bucket's parameters are gathered together, then released. Which transport
moves them, and the driver's side of each, is ``weight_transport.py``.
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
_ALIGN = 16  # every tensor starts at a 16-byte offset so any dtype can be viewed out of the byte buffer


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
    """Order-independent digest of named tensors: what the checksum proof compares (a receiver's weights against
    the trainer's)."""
    return combine_digests(tensor_digests(named))


def _gathered(params: list[torch.nn.Parameter], zero_stage: int) -> Any:
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return nullcontext()


def _nbytes(p: torch.nn.Parameter) -> int:
    return (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) * p.element_size()


Named = list[tuple[str, torch.nn.Parameter]]
Transform = Callable[[str, torch.Tensor], torch.Tensor]


def _named(source: torch.nn.Module | Named) -> Named:
    return list(source.named_parameters()) if isinstance(source, torch.nn.Module) else source


def bucket_groups(source: torch.nn.Module | Named, bucket_bytes: int) -> list[Named]:
    """The one bucket plan: consecutive parameters up to ``bucket_bytes`` each (a larger tensor is a bucket of
    its own). Every transport and both sides of a sync derive their buckets from this, never on their own.
    Tied parameters appear once, under their first name. ``source``: a module, or its (name, parameter)
    list as receivers know it (LoRA: the plain model's names)."""
    groups: list[Named] = []
    total = 0
    for name, p in _named(source):
        if groups and total + _nbytes(p) <= bucket_bytes:
            groups[-1].append((name, p))
            total += _nbytes(p)
        else:
            groups.append([(name, p)])
            total = _nbytes(p)
    return groups


def gather_bucket(group: Named, zero_stage: int = 0, to_cpu: bool = True, transform: Transform | None = None) -> Bucket:
    """One bucket of full (gathered) tensors, copied out of the training graph; ``transform`` (name, tensor) ->
    tensor makes what is sent from what is held (LoRA: the adapter folded into the base weight).

    Collective under ZeRO-3: every trainer rank must call it for the same group; ranks > 0 may drop the result.
    """
    with _gathered([p for _, p in group], zero_stage):
        tensors = []
        for name, p in group:
            t = p.detach() if transform is None else transform(name, p.detach())
            tensors.append(t.to("cpu", copy=True) if to_cpu else t.clone())
    return Bucket([n for n, _ in group], tensors)


def iter_param_buckets(
    source: torch.nn.Module | Named,
    bucket_bytes: int,
    zero_stage: int = 0,
    to_cpu: bool = True,
    transform: Transform | None = None,
) -> Iterator[Bucket]:
    """Every bucket of ``bucket_groups``, in order (collective under ZeRO-3, as ``gather_bucket``)."""
    for group in bucket_groups(source, bucket_bytes):
        yield gather_bucket(group, zero_stage, to_cpu, transform)


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


# ------------------------------------------------ the GPU transports' wire format: one flat buffer per bucket
def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _padded(nbytes: int) -> int:
    return (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN


def _meta_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One flat byte buffer for a bucket: one collective / one IPC handle per bucket, not per tensor."""
    parts = []
    for t in tensors:
        b = t.contiguous().reshape(-1).view(torch.uint8)
        parts.append(b)
        if _padded(b.numel()) > b.numel():
            parts.append(torch.zeros(_padded(b.numel()) - b.numel(), dtype=torch.uint8, device=b.device))
    return torch.cat(parts)


def unpack(flat: torch.Tensor, meta: Meta) -> list[tuple[str, torch.Tensor]]:
    out, offset = [], 0
    for name, dtype, shape in meta:
        n = _meta_nbytes(dtype, shape)
        out.append((name, flat[offset : offset + n].view(getattr(torch, dtype)).reshape(shape)))
        offset += _padded(n)
    return out


def plan_nbytes(meta: Meta) -> int:
    return sum(_padded(_meta_nbytes(dt, shape)) for _, dt, shape in meta)


class GlooGroup:
    """The weight group on CPU: PyNccl's ``broadcast(tensor, src)`` over gloo, in a process group of its own
    (a TCP store at rank 0's address; nothing global is initialized, so it can be rebuilt after a restart like
    the NCCL one). It lets the collective transport run where there is no GPU: CPU clusters, and CI."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float) -> None:
        from datetime import timedelta

        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()


def broadcast(group: Any, flat: torch.Tensor) -> None:
    """One packed bucket through the weight group from rank 0, the trainer: on a GPU on the current stream and
    complete on return, as PyNccl's receivers expect; on CPU gloo's ``wait`` is the completion."""
    if flat.is_cuda:
        group.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        torch.cuda.current_stream().synchronize()
    else:
        group.broadcast(flat, src=0)


def broadcast_bucket(group: Any, bucket: Bucket) -> None:
    """The trainer's half of a collective sync, one bucket: packed, broadcast from rank 0 of the weight group."""
    broadcast(group, pack(bucket.tensors))


def ipc_handles(flat: torch.Tensor) -> dict[str, Any]:
    """A CUDA IPC handle of ``flat``, keyed by its GPU's uuid: each receiving TP worker opens the one on its GPU."""
    from torch.multiprocessing.reductions import reduce_tensor

    uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
    return {uuid: reduce_tensor(flat)}
