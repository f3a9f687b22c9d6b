"""The trainer's end of every weight transport: its weights as buckets, for engines and separate teachers.

A mixin of ``StudentTrainer`` (Ray calls these as the actor's methods): the object store gets one bucket per
call (``publish_bucket``), CUDA IPC one handle per bucket (``ipc_bucket``), NCCL one broadcast of all of them
(``send_nccl``). The driver's side of each transport is ``sdft_ray/weight_transport.py``, the engines' side
``actors/vllm_engine.py``; the wire format ``sdft_ray/weight_sync.py``.
"""

from __future__ import annotations

from typing import Any

import torch

from sdft_ray import lora
from sdft_ray.config import Config
from sdft_ray.weight_sync import (
    Bucket,
    Meta,
    Named,
    Transform,
    broadcast_bucket,
    bucket_checksum,
    bucket_groups,
    dtype_name,
    gather_bucket,
    ipc_handles,
    iter_param_buckets,
    model_checksum,
    pack,
)


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

    def num_buckets(self, which: str = "student") -> int:
        return len(bucket_groups(self._source(which)[0], self._bucket_bytes()))

    def publish_bucket(self, which: str, index: int) -> Bucket | None:
        """Bucket ``index`` of the current weights, as this call's return value: Ray keeps it in the object
        store for as long as the driver holds the reference, so the driver bounds how many exist at once.

        Every rank must call this under ZeRO-3 (the gather is collective); ranks > 0 return None.
        """
        named, stage, transform = self._source(which)
        b = gather_bucket(bucket_groups(named, self._bucket_bytes())[index], stage, transform=transform)
        if self.rank != 0:
            return None
        if self.cfg.pipeline.verify_weight_checksums:
            b.checksum = bucket_checksum(b.names, b.tensors)
        return b

    # GPU transports (vLLM engines): NCCL broadcast or CUDA IPC, one flat buffer per bucket
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
        """Rank 0 joins the collective weight group as its source (rank 0 of the group); the engines join too.
        Called again after an engine restart: the new group replaces the one that held the dead member."""
        from actors.vllm_engine import weight_group

        if self.rank == 0:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            timeout = self.cfg.pipeline.sync_timeout_s
            self._weight_group = weight_group(host, port, 0, world_size, device, timeout)

    def send_nccl(self, which: str = "student") -> None:
        named, stage, transform = self._source(which)
        for b in iter_param_buckets(named, self._bucket_bytes(), stage, to_cpu=False, transform=transform):
            if self.rank == 0:
                broadcast_bucket(self._weight_group, b)

    def ipc_bucket(self, i: int, which: str = "student") -> dict[str, Any]:
        """CUDA IPC handle of bucket ``i`` packed on this GPU; kept alive until the next call or ipc_done."""
        if i == 0:  # one pass over the buckets per sync; only the current one is materialized
            named, stage, transform = self._source(which)
            self._ipc_iter = iter_param_buckets(named, self._bucket_bytes(), stage, to_cpu=False, transform=transform)
        bucket = next(self._ipc_iter)
        self._ipc_flat = pack(bucket.tensors)
        torch.cuda.synchronize()
        return ipc_handles(self._ipc_flat)

    def ipc_done(self) -> None:
        self._ipc_flat, self._ipc_iter = None, None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # release the shared buckets the engine has closed (as vLLM and verl do)

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
