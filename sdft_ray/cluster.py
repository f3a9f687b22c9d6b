"""Starting and watching actors on a Ray cluster: joining it, placing trainers, restartable actor groups.

The driver's loop lives in driver.py; this is the start-up and liveness code it and the eval/bench entry
points share.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from sdft_ray.config import Config
from sdft_ray.errors import ActorFailure, stop_on_signals
from sdft_ray.network import is_loopback, ray_on_loopback

log = logging.getLogger(__name__)


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a `ray job submit` (RAY_ADDRESS) or start a private local one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level=logging.WARNING)
    else:
        # No dashboard, and every Ray process listening on 127.0.0.1 only: a laptop run must not listen on
        # the network.
        ray_on_loopback()
        # WARNING: Ray's INFO lines ("Started a local Ray instance") are not the user's business on a console
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
        if not is_loopback(ray.util.get_node_ip_address()):
            log.warning("sdft-ray: this Ray version listens on the network even for a local run")
    stop_on_signals()  # ray.init installed its own SIGTERM handler, which aborts without stopping our actors


def actor_runtime_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Environment of every actor: its thread budget, the driver's decisions (``extra``: the CPU precision), and
    no per-actor library load bars on the console."""
    return {
        "env_vars": {
            **(extra or {}),
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            # Tensors of 1 MB and more get their own mapping and go back to the OS when freed. glibc's default
            # threshold rises after the first large free, after which activations come from the heap and are
            # kept: a 0.5B trainer on CPU then grew by ~1 GB per step until Ray's memory monitor killed it.
            "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
            # ... and each such mapping then faults in 4 KB at a time: a 1.5B LoRA trainer spent a third of its
            # CPU in the kernel. torch's allocator asks for 2 MB pages instead: SFT step 24-35 -> 19-20 s on AMX,
            # the same peak memory (docs/benchmarks.md). Linux only; elsewhere torch ignores it.
            "THP_MEM_ALLOC_ENABLE": "1",
            # the driver found the hub unreachable and the model cached (sdft_ray/hub.py): actors read the cache
            **({"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]} if "HF_HUB_OFFLINE" in os.environ else {}),
        }
    }


@dataclass
class ActorGroup:
    """N actors of one role, restartable one by one."""

    cls: Any
    options: dict[str, Any]
    args: tuple = ()
    per_actor_args: list[tuple] = field(default_factory=list)
    actors: list[Any] = field(default_factory=list)
    restarts: list[int] = field(default_factory=list)  # per actor: a limit on one flapping actor, not the group

    def start(self, n: int) -> ActorGroup:
        import ray

        remote_cls = ray.remote(self.cls)
        self._remote = remote_cls
        self.actors = [
            remote_cls.options(**self.options).remote(
                *self.args, *(self.per_actor_args[i] if self.per_actor_args else ())
            )
            for i in range(n)
        ]
        self.restarts = [0] * n
        return self

    def restart(self, i: int) -> Any:
        import ray

        ray.kill(self.actors[i], no_restart=True)
        extra = self.per_actor_args[i] if self.per_actor_args else ()
        self.actors[i] = self._remote.options(**self.options).remote(*self.args, *extra)
        self.restarts[i] += 1
        return self.actors[i]


def trainer_bundles(cfg: Config) -> list[dict[str, float]]:
    """The trainers' placement group: one bundle per rank.

    With CUDA IPC the engine must sit on trainer 0's GPU, the only one its memory handles open on, so bundle 0
    holds the engine too (as OpenRLHF's hybrid engine shares bundles); left to Ray, a node with several GPUs
    may put the engine on another one.
    """
    t, r = cfg.train, cfg.rollout
    bundles = [{"CPU": t.num_cpus, **({"GPU": t.num_gpus} if t.num_gpus else {})} for _ in range(t.num_trainers)]
    if cfg.weight_transport == "ipc" and cfg.runs_rollout_engines:
        bundles[0] = {"CPU": t.num_cpus + r.num_cpus, "GPU": t.num_gpus + r.num_gpus}
    return bundles


def check_resources(cfg: Config, cluster: dict[str, float]) -> None:
    """Fail in seconds, naming the settings, when the job asks for more CPUs/GPUs than the cluster has in all.

    Without this, Ray waits for resources that will never appear and the job dies at pipeline.call_timeout_s.
    """
    t, r, te = cfg.train, cfg.rollout, cfg.teacher
    # (role, actors, CPUs each, GPUs each), for the roles start_actors() starts
    roles = [("train", t.num_trainers, t.num_cpus, t.num_gpus)]
    if cfg.runs_rollout_engines:
        roles.append(("rollout", r.num_engines, r.num_cpus, r.num_gpus))
    if cfg.runs_teacher_actors:
        roles.append(("teacher", te.num_actors, te.num_cpus, te.num_gpus))
    for kind, col in (("CPU", 2), ("GPU", 3)):
        amount = sum(role[1] * role[col] for role in roles)
        have = cluster.get(kind, 0.0)
        if amount > have + 1e-9:
            parts = ", ".join(f"{role[0]}: {role[1]} x {role[col]}" for role in roles)
            raise ActorFailure(
                f"the job needs {amount:g} {kind}s ({parts}) but the Ray cluster has {have:g}; "
                f"lower the num_{kind.lower()}s settings or add nodes"
            )


def alive_nodes() -> dict[str, str]:
    """Node id -> address of every node Ray reports alive."""
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


def describe_nodes(nodes: dict[str, str]) -> str:
    return ", ".join(f"{addr} (id {nid[:12]})" for nid, addr in nodes.items())


def dead_actors(actors: list[Any], timeout: float = 30.0) -> list[int]:
    """Indices of the actors that are dead, all probed at once.

    Dead means Ray says so: a probe answered with ``ActorDiedError``, or, for a probe still unanswered at the
    deadline, the actor's state in Ray's actor table. A busy actor is alive however long its running method
    takes (its probe waits in line behind it, and the table says ALIVE), and so is a hung one: the call it hangs
    in meets its own timeout. A probe that fails because the connection dropped (``ActorUnavailableError``: Ray
    has no verdict yet; a lost node is declared dead only after its health checks) is sent again.
    """
    import time

    import ray

    deadline = time.monotonic() + timeout
    pending = {i: a.pid.remote() for i, a in enumerate(actors)}
    dead: set[int] = set()
    while pending and time.monotonic() < deadline:
        ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            i = next(k for k, v in pending.items() if v == ref)
            del pending[i]
            try:
                ray.get(ref)
            except ray.exceptions.ActorUnavailableError:
                time.sleep(0.2)
                pending[i] = actors[i].pid.remote()
            except ray.exceptions.RayActorError:
                dead.add(i)
    dead.update(i for i in pending if actor_state(actors[i]) == "DEAD")
    return sorted(dead)


def actor_state(actor: Any) -> str:
    """Ray's own record of an actor (ALIVE, RESTARTING, DEAD, ...), read from its actor table without calling
    the actor. The one use of a private Ray module: the public state API needs the dashboard, which local runs
    do not start."""
    from ray._private import state

    info = state.actors(actor._actor_id.hex())
    return str(info.get("State", "UNKNOWN")) if info else "UNKNOWN"


def get(refs: Any, what: str, timeout: float, error: type[ActorFailure] = ActorFailure, setting: str = "") -> Any:
    """``ray.get`` with a deadline: a timeout raises ``error`` naming ``what`` and the setting that bounds it."""
    import ray

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        where = f" ({setting})" if setting else ""
        raise error(f"{what}: no answer within {timeout:.0f}s{where}; the run stops instead of hanging") from None
