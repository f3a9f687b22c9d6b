"""The trainer as a weight sender: its weights as buckets, for engines and separate teachers.

A mixin of ``StudentTrainer`` (Ray calls these as the actor's methods). What each transport does on the
trainer's side lives with the rest of that transport in ``sdft_ray/weight_transport.py`` (``sender_*``); here
are the one-line actor methods that run it, the bucket plan the GPU transports share, and the checksums the
driver compares receivers with. The wire format is ``sdft_ray/weight_sync.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from actors.vllm_engine import weight_group
from sdft_ray import lora
from sdft_ray.config import Config
from sdft_ray.weight_sync import (
    Bucket,
    Meta,
    Named,
    Transform,
    bucket_groups,
    dtype_name,
    iter_param_buckets,
    model_checksum,
)
from sdft_ray.weight_transport import CudaIpcTransport, NcclTransport, ObjectStoreTransport


class WeightSender:
    """Needs of its host: ``cfg``, ``rank``, ``lora``, ``engine`` (DeepSpeed), ``module`` (the HF model) and
    ``teacher`` (a ``TeacherScorer`` or None)."""

    cfg: Config
    rank: int
    lora: bool
    engine: Any
    teacher: Any
    module: torch.nn.Module

    def _bucket_bytes(self) -> int:
        return int(self.cfg.pipeline.sync_bucket_mb * 2**20)

    # each transport's trainer end lives with the rest of it in sdft_ray/weight_transport.py
    def num_buckets(self, which: str = "student") -> int:
        return ObjectStoreTransport.sender_count(self, which)

    def publish_bucket(self, which: str, index: int) -> Bucket | None:
        return ObjectStoreTransport.sender_publish(self, which, index)

    # the bucket plan both GPU transports (NCCL, CUDA IPC) send by
    def sync_plan(self, which: str = "student") -> list[Meta]:
        """Bucket layout (names, dtypes, full shapes) without gathering: engines allocate before the send."""
        named, _, _ = self._source(which)
        return [
            [
                (name, dtype_name(p.dtype), tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape))
                for name, p in g
            ]
            for g in bucket_groups(named, self._bucket_bytes())
        ]

    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        NcclTransport.sender_join(self, weight_group, host, port, world_size)

    def send_nccl(self, which: str = "student") -> None:
        NcclTransport.sender_broadcast(self, which)

    def ipc_bucket(self, i: int, which: str = "student") -> dict[str, Any]:
        return CudaIpcTransport.sender_share(self, i, which)

    def ipc_done(self) -> None:
        CudaIpcTransport.sender_release(self)

    def buckets(self, which: str = "student") -> list[Bucket]:
        """The same buckets, in-process (used by GPU transports and tests)."""
        named, stage, transform = self._source(which)
        return list(iter_param_buckets(named, self._bucket_bytes(), stage, transform=transform))

    def _source(self, which: str) -> tuple[Named, int, Transform | None]:
        """What a sync of ``which`` sends: (name, parameter) as receivers name them, the ZeRO stage to gather
        under, and the per-tensor transform (LoRA: fold that role's adapter into the base weight)."""
        if which == "teacher" and self.teacher is None:
            raise ValueError("this trainer holds no teacher weights")
        if self.lora:
            adapter = lora.TEACHER if which == "teacher" else lora.STUDENT
            return lora.merged_names(self.engine.module), 0, lora.Merger(self.engine.module, adapter)
        if which == "teacher":
            return list(self.teacher.model.named_parameters()), 0, None
        return list(self.module.named_parameters()), self.cfg.train.zero_stage, None

    def checksum(self, which: str = "student") -> str:
        return model_checksum((n, t) for b in self.buckets(which) for n, t in zip(b.names, b.tensors, strict=True))

    def state_dict_cpu(self, which: str = "student") -> dict[str, torch.Tensor]:
        return {n: t for b in self.buckets(which) for n, t in zip(b.names, b.tensors, strict=True)}
