"""What every actor answers about its own process: liveness (pid) and peak memory, for the driver and bench;
and the one thing every actor does first: see only the GPUs Ray gave it."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def visible_devices(environ: Mapping[str, str], gpu_ids: Sequence[object]) -> str | None:
    """The CUDA_VISIBLE_DEVICES an actor must set itself, or None when Ray has set it already.

    Clusters that run with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 (verl sets it for its vLLM servers)
    show every actor every GPU, and ``cuda`` would then mean GPU 0 for all of them (OpenRLHF does the same).
    """
    if environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES", "") in ("", "0") or not gpu_ids:
        return None
    return ",".join(str(g) for g in gpu_ids)


def pin_visible_gpus() -> None:
    """Call first in every actor constructor, before anything touches CUDA."""
    import ray

    value = visible_devices(os.environ, ray.get_gpu_ids() if ray.is_initialized() else [])
    if value is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


class ActorProcess:
    def pid(self) -> int:
        """Also the driver's liveness ping: an answer means the process is up."""
        return os.getpid()

    def device_memory(self) -> dict[str, float]:
        """Free and total memory of this actor's GPU as the driver sees it (device-wide, every process), in MB."""
        import torch

        if not torch.cuda.is_available():
            return {}
        free, total = torch.cuda.mem_get_info()
        return {"free_mb": free / 2**20, "total_mb": total / 2**20}

    def peak_memory(self) -> dict[str, float]:
        from sdft_ray.modeling import peak_memory_mb

        return peak_memory_mb()
