"""What every actor answers about its own process: liveness (pid) and peak memory, for the driver and bench."""

from __future__ import annotations

import os


class ActorProcess:
    def pid(self) -> int:
        """Also the driver's liveness ping: an answer means the process is up."""
        return os.getpid()

    def peak_memory(self) -> dict[str, float]:
        from sdft_ray.modeling import peak_memory_mb

        return peak_memory_mb()
