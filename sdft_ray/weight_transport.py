"""Moving the trainer's weights into the rollout engines and separate teachers: each transport in one class.

Every transport has one shape, as verl's checkpoint engines do: ``prepare`` once every actor is up (and again,
``WeightPublisher.reconnect``, after an engine restart), then per sync ``send`` (queue the transfer of one weight
version; returns at once where the transport allows) and ``wait`` (block until it landed; returns its seconds).
Each class also holds its other ends as static methods, run inside the trainer (its ``sender_*``, called by
``actors/weight_sender.py``'s one-line actor methods) and inside the engine (``receiver_*``, called by the vLLM
worker extension in ``actors/vllm_engine.py``), so one transport is read in one place. All cut the weights into
the same buckets (``weight_sync.bucket_groups``):

  ObjectStoreTransport  CPU, and separate teachers everywhere: trainer publishes bucket i as a Ray object,
                        each receiver loads it; at most ``pipeline.sync_inflight_buckets`` exist at once.
  CudaIpcTransport      an engine on the trainer's GPU: per bucket, a CUDA IPC handle of the packed bucket.
  NcclTransport         engines on GPUs of their own: one broadcast per bucket into every engine, in a group
                        rebuilt with every member after an engine restart (gloo when there is no GPU).

``WeightPublisher`` decides which receiver gets which transport and proves, on every sync with
``pipeline.verify_weight_checksums`` and every ``pipeline.verify_weights_every``-th otherwise, that what arrived
equals what the trainer holds.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor

from sdft_ray.cluster import get
from sdft_ray.config import Config
from sdft_ray.errors import WeightSyncError, WeightSyncTimeout
from sdft_ray.weight_sync import (
    broadcast,
    broadcast_bucket,
    bucket_checksum,
    bucket_groups,
    gather_bucket,
    ipc_handles,
    iter_param_buckets,
    pack,
    unpack,
)


class WeightTransport:
    """One way of moving one weight version from the trainers to a set of receivers."""

    def __init__(self, cfg: Config, trainers: list[Any]) -> None:
        self.cfg, self.trainers = cfg, trainers
        self.pending: list[Any] = []  # refs whose results carry {"seconds": ...} (or None)
        self.seconds = 0.0

    def _get(self, refs: Any, what: str) -> Any:
        return get(refs, what, self.cfg.pipeline.sync_timeout_s, WeightSyncTimeout, "pipeline.sync_timeout_s")

    def prepare(self, receivers: list[Any]) -> None:
        """Once, after every actor is up (a collective group needs all its members)."""

    def send(self, receivers: list[Any], which: str, version: int) -> None:
        raise NotImplementedError

    def wait(self) -> float:
        """Block until the last ``send`` landed everywhere; the seconds it took (the slowest receiver)."""
        if self.pending:
            p = self.cfg.pipeline
            done = get(
                self.pending,
                "weight sync",
                p.sync_timeout_s + p.call_timeout_s,
                WeightSyncTimeout,
                "pipeline.sync_timeout_s + pipeline.call_timeout_s",
            )
            self.pending = []
            self.seconds = max((d["seconds"] for d in done if d), default=0.0)  # trainer ranks > 0 answer None
        return self.seconds

    def drop(self) -> None:
        """Forget what is in flight (its receivers were restarted; the driver sends again)."""
        self.pending = []


class ObjectStoreTransport(WeightTransport):
    def send(self, receivers: list[Any], which: str, version: int) -> None:
        self.stream(which, receivers, version)

    def stream(self, which: str, receivers: list[Any], version: int) -> None:
        """Bucket by bucket: the trainer publishes bucket i, every receiver loads it, and at most
        ``pipeline.sync_inflight_buckets`` buckets exist in the object store at once (0 = no bound: every bucket
        is queued at once and the receivers load them when they get to it, so the driver never waits, but the
        whole model sits in the object store). All calls come from the driver, so each receiver runs them in
        order, before any rollout launched after this sync."""
        bound = self.cfg.pipeline.sync_inflight_buckets
        n = self._get(self.trainers[0].num_buckets.remote(which), "weight sync plan")
        inflight: deque[list[Any]] = deque()
        for i in range(n):
            published = [tr.publish_bucket.remote(which, i) for tr in self.trainers]  # collective under ZeRO-3
            acks = [a.receive_bucket.remote(published[0], i == n - 1, version) for a in receivers]
            inflight.append(published[1:] + acks)
            while bound and len(inflight) > bound:
                self._get(inflight.popleft(), "weight sync")
        self.pending += [ref for refs in inflight for ref in refs]  # the tail: waited for in wait()

    # the trainer's end; the receivers' is the backends' generic ``load_bucket`` (HF and vLLM, engines and teachers)
    @staticmethod
    def sender_count(sender: Any, which: str) -> int:
        return len(bucket_groups(sender._source(which)[0], sender._bucket_bytes()))

    @staticmethod
    def sender_publish(sender: Any, which: str, index: int) -> Any:
        """Bucket ``index`` of the current weights, as the actor call's return value: Ray keeps it in the object
        store for as long as the driver holds the reference, so the driver bounds how many exist at once.
        Every rank must call this under ZeRO-3 (the gather is collective); ranks > 0 return None."""
        named, stage, transform = sender._source(which)
        b = gather_bucket(bucket_groups(named, sender._bucket_bytes())[index], stage, transform=transform)
        if sender.rank != 0:
            return None
        if sender.cfg.pipeline.verify_weight_checksums:
            b.checksum = bucket_checksum(b.names, b.tensors)
        return b


class CudaIpcTransport(WeightTransport):
    """Synchronous: the engine opens each handle while the trainer keeps that bucket alive."""

    def prepare(self, receivers: list[Any]) -> None:
        self.plan = self._get(self.trainers[0].sync_plan.remote(), "sync plan")

    def send(self, receivers: list[Any], which: str, version: int) -> None:
        t0 = time.perf_counter()
        for i, meta in enumerate(self.plan):
            handles = [tr.ipc_bucket.remote(i) for tr in self.trainers][0]
            self._get([e.receive_ipc.remote(handles, meta, version) for e in receivers], "ipc weight sync")
        self._get([tr.ipc_done.remote() for tr in self.trainers], "ipc weight sync")
        self._get([e.finish_update.remote(version) for e in receivers], "ipc weight sync")
        self.seconds = time.perf_counter() - t0

    @staticmethod
    def sender_share(sender: Any, i: int, which: str) -> dict[str, Any]:
        """The trainer's end: a CUDA IPC handle of bucket ``i`` packed on its GPU, kept alive until the next call
        or ``sender_release``; one pass over the buckets per sync, only the current one materialized."""
        if i == 0:
            named, stage, transform = sender._source(which)
            nbytes = sender._bucket_bytes()
            sender._ipc_iter = iter_param_buckets(named, nbytes, stage, to_cpu=False, transform=transform)
        sender._ipc_flat = pack(next(sender._ipc_iter).tensors)
        torch.cuda.synchronize()
        return ipc_handles(sender._ipc_flat)

    @staticmethod
    def sender_release(sender: Any) -> None:
        sender._ipc_flat, sender._ipc_iter = None, None
        if torch.cuda.is_available():
            torch.cuda.ipc_collect()  # release the shared buckets the engine has closed (as vLLM and verl do)

    @staticmethod
    def receiver_open(worker: Any, handles: dict[str, Any], meta: Any) -> None:
        """The engine's end, in each vLLM worker: open the handle made on this worker's GPU and load it."""
        # handles are keyed by the physical GPU uuid so each TP worker opens the one on its own device
        uuid = str(torch.cuda.get_device_properties(worker.device).uuid)
        if uuid not in handles:
            raise WeightSyncError(f"no CUDA IPC handle for this engine's GPU {uuid}: it must share the trainer's GPU")
        func, args = handles[uuid]
        if func is not rebuild_cuda_tensor:
            raise WeightSyncError("unexpected CUDA IPC handle")
        args = list(args)
        args[6] = worker.device.index  # the sender's device index means nothing in this process
        worker._sdft_load(unpack(func(*args), meta))
        torch.cuda.synchronize()


class NcclTransport(WeightTransport):
    """The engines receive while the trainer sends: nothing blocks until ``wait``."""

    def prepare(self, receivers: list[Any]) -> None:
        r = self.cfg.rollout
        world = 1 + len(receivers) * r.tensor_parallel_size
        self.plan = self._get(self.trainers[0].sync_plan.remote(), "sync plan")
        host, port = self._get(self.trainers[0].free_address.remote(), "NCCL weight group setup")
        refs = [tr.init_weight_group.remote(host, port, world) for tr in self.trainers]
        refs += [
            e.init_weight_group.remote(host, port, 1 + i * r.tensor_parallel_size, world)
            for i, e in enumerate(receivers)
        ]
        self._get(refs, "NCCL weight group setup")
        self.sends: list[Any] = []

    def send(self, receivers: list[Any], which: str, version: int) -> None:
        self.sends = [tr.send_nccl.remote() for tr in self.trainers]
        self.pending += [e.receive_nccl.remote(self.plan, version) for e in receivers]

    def wait(self) -> float:
        seconds = super().wait()
        if self.sends:
            self._get(self.sends, "weight send")
            self.sends = []
        return seconds

    @staticmethod
    def sender_join(sender: Any, weight_group: Any, host: str, port: int, world_size: int) -> None:
        """The trainer's end: rank 0 joins the group as its source (rank 0 of it). Called again after an engine
        restart: the new group replaces the one that held the dead member. ``weight_group`` builds a member (the
        vLLM adapter's: PyNccl on a GPU, gloo on CPU)."""
        if sender.rank == 0:
            cuda = torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
            timeout = sender.cfg.pipeline.sync_timeout_s
            sender._weight_group = weight_group(host, port, 0, world_size, device, timeout)

    @staticmethod
    def sender_broadcast(sender: Any, which: str) -> None:
        """Every bucket, gathered on every rank (collective under ZeRO-3), broadcast by rank 0."""
        named, stage, transform = sender._source(which)
        for b in iter_param_buckets(named, sender._bucket_bytes(), stage, to_cpu=False, transform=transform):
            if sender.rank == 0:
                broadcast_bucket(sender._weight_group, b)

    @staticmethod
    def receiver_join(
        worker: Any, weight_group: Any, host: str, port: int, rank: int, world_size: int, timeout_s: float
    ) -> None:
        """The engine's end, in each vLLM worker (``rank``: the engine's offset plus the worker's TP rank)."""
        worker._sdft_group = weight_group(host, port, rank, world_size, worker.device, timeout_s)

    @staticmethod
    def receiver_take(worker: Any, meta: Any, nbytes: int) -> None:
        flat = torch.empty(nbytes, dtype=torch.uint8, device=worker.device)
        broadcast(worker._sdft_group, flat)
        worker._sdft_load(unpack(flat, meta))


TRANSPORTS: dict[str, type[WeightTransport]] = {
    "object_store": ObjectStoreTransport,
    "ipc": CudaIpcTransport,
    "nccl": NcclTransport,
}


class WeightPublisher:
    """Every sync of one run: the engines by ``cfg.weight_transport``, separate teachers by the object store
    (a teacher actor has no vLLM worker to receive a GPU transfer), each checked against the trainer."""

    def __init__(self, cfg: Config, trainers: list[Any], engines: list[Any], teachers: list[Any]) -> None:
        self.cfg, self.trainers = cfg, trainers
        self.object_store = ObjectStoreTransport(cfg, trainers)
        self.engine_transport = TRANSPORTS[cfg.weight_transport](cfg, trainers) if engines else self.object_store
        self.engines, self.teachers = engines, teachers
        kind = cfg.teacher.kind
        # what each separate teacher receives: the EMA teacher's own weights, or the student's ("student" kind)
        self.teacher_source = {"ema": "teacher", "student": "student"}.get(kind)
        self.checks: list[tuple[Any, Any, Any]] = []  # (receiver's checksum ref, trainer's, receiver)
        self.verified = 0
        self.connections = 0  # times the engine transport was set up: 1 at start, +1 after each engine restart

    @property
    def seconds(self) -> float:
        return max(self.engine_transport.seconds, self.object_store.seconds)

    def prepare(self) -> None:
        self.engine_transport.prepare(self.engines)
        self.connections = 1

    def reconnect(self) -> None:
        """After engines were restarted: a collective group that held a dead member cannot be reused, and a new
        engine holds none, so every member joins a fresh one (NCCL); other transports only re-read their plan."""
        self.engine_transport.prepare(self.engines)
        self.connections += 1

    def publish(self, version: int) -> None:
        """Send the trainer's current weights (version ``version``) to every engine and separate teacher.

        Calls are queued on each actor behind rollouts already launched, which therefore keep the older
        version: that is the bounded staleness, not a race.
        """
        groups: dict[tuple[WeightTransport, str], list[Any]] = {}  # one stream per source and transport
        groups.setdefault((self.engine_transport, "student"), []).extend(self.engines)
        if self.teacher_source:
            groups.setdefault((self.object_store, self.teacher_source), []).extend(self.teachers)
        for (transport, which), receivers in groups.items():
            if not receivers:
                continue
            verify = self.cfg.verifies(version)
            if verify:  # queued on the trainer before any later step
                expected = [tr.checksum.remote(which) for tr in self.trainers][0]
            transport.send(receivers, which, version)
            if verify:  # queued behind the update on each receiver
                self.checks += [(a.checksum.remote(), expected, a) for a in receivers]

    def wait(self, version: int) -> None:
        """Block until the last publish landed; where it was verified (``Config.verifies``), prove that every
        receiver holds the trainer's weights."""
        for t in dict.fromkeys((self.engine_transport, self.object_store)):
            t.wait()
        for got, want, actor in self.checks:
            got, want = get([got, want], "weight checksum", self.cfg.pipeline.call_timeout_s)
            if got != want:
                raise WeightSyncError(f"weights at {actor} differ from the trainer's after sync v{version}")
            self.verified += 1
        self.checks = []

    def drop(self) -> None:
        """After a restart: what was in flight may never land; the driver publishes again."""
        for t in (self.engine_transport, self.object_store):
            t.drop()
        self.checks = []
