"""Every actor of one run: started in the order shared GPUs need, probed, measured and stopped together.

The driver owns the loop; this owns the processes (trainer ranks in a placement group, rollout engines and
separate teachers as restartable groups)."""

from __future__ import annotations

import sys
from typing import Any

from sdft_ray.cluster import ActorGroup, actor_runtime_env, check_resources, get, trainer_bundles
from sdft_ray.config import Config
from sdft_ray.network import free_address
from sdft_ray.precision import decide_for_actors


class RunActors:
    def __init__(self, cfg: Config, total_steps: int) -> None:
        self.cfg, self.total_steps = cfg, total_steps
        self.rollouts: ActorGroup | None = None
        self.teachers: ActorGroup | None = None
        self.trainers: list[Any] = []
        self.trainer_pg: Any = None

    def _get(self, refs: Any, what: str) -> Any:
        return get(refs, what, self.cfg.pipeline.call_timeout_s, setting="pipeline.call_timeout_s")

    def start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutWorker
        from actors.teacher import TeacherWorker
        from actors.trainer import StudentTrainer

        cfg, raw = self.cfg, self.cfg.to_dict()
        t, r, te = cfg.train, cfg.rollout, cfg.teacher
        models_on_cpu = (
            not t.num_gpus
            or (cfg.runs_rollout_engines and not r.num_gpus)
            or (cfg.runs_teacher_actors and not te.num_gpus)
        )
        env = actor_runtime_env(t.torch_threads, decide_for_actors(cfg.model.dtype == "auto" and models_on_cpu))
        check_resources(cfg, ray.cluster_resources())
        bundles = trainer_bundles(cfg)
        self.trainer_pg = placement_group(bundles, strategy="PACK")
        self._get(self.trainer_pg.ready(), f"placing {t.num_trainers} trainer(s) in {bundles}")

        def in_bundle(i: int) -> dict[str, Any]:
            return {
                "num_cpus": t.num_cpus,
                "num_gpus": t.num_gpus,
                "runtime_env": env,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    self.trainer_pg, placement_group_bundle_index=i
                ),
            }

        self.rollouts = None
        if cfg.runs_rollout_engines:
            opts = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "runtime_env": env}
            if cfg.weight_transport == "ipc":  # on trainer 0's GPU (see trainer_bundles), restarts included
                opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.trainer_pg, 0)
            self.rollouts = ActorGroup(RolloutWorker, opts, (raw,), [(i,) for i in range(r.num_engines)])
            self.rollouts.start(r.num_engines)
            if cfg.weight_transport == "ipc":
                # Sharing a GPU: vLLM sizes its memory from device-wide usage at start-up, so the trainer
                # must not be allocating at the same time; the engines start, then sleep, then the trainer.
                self._get([a.pid.remote() for a in self.rollouts.actors], "rollout startup")
                self._get([a.sleep.remote() for a in self.rollouts.actors], "rollout startup")
        addr, port = "127.0.0.1", 0  # one trainer binds a port of the kernel's choosing: nothing can take it first
        if t.num_trainers > 1:
            # chosen on trainer 0's node once the engines (which open ports by the hundred) are up
            addr, port = ray.get(
                ray.remote(num_cpus=0)(free_address).options(**{**in_bundle(0), "num_cpus": 0, "num_gpus": 0}).remote()
            )
        trainer_cls = ray.remote(StudentTrainer)
        self.trainers = [
            trainer_cls.options(**in_bundle(i)).remote(raw, self.total_steps, i, t.num_trainers, addr, port)
            for i in range(t.num_trainers)
        ]
        self.teachers = None
        if cfg.runs_teacher_actors:
            opts = {"num_cpus": te.num_cpus, "num_gpus": te.num_gpus, "runtime_env": env}
            self.teachers = ActorGroup(TeacherWorker, opts, (raw,)).start(te.num_actors)
        # surface constructor errors (bad model path, DeepSpeed init) now, with the role named
        self._get([a.pid.remote() for a in self.trainers], "trainer startup")
        for group, name in ((self.rollouts, "rollout"), (self.teachers, "teacher")):
            if group is not None:
                self._get([a.pid.remote() for a in group.actors], f"{name} startup")
        if self.rollouts is not None:
            backend = self._get(self.rollouts.actors[0].backend_name.remote(), "rollout startup")
            print(f"sdft-ray: rollout backend: {backend}", file=sys.stderr, flush=True)

    @property
    def engines(self) -> list[Any]:
        return self.rollouts.actors if self.rollouts is not None else []

    @property
    def teacher_actors(self) -> list[Any]:
        return self.teachers.actors if self.teachers is not None else []

    def shutdown(self) -> None:
        import ray

        for group in (self.rollouts, self.teachers):
            for a in group.actors if group is not None else []:
                ray.kill(a)
        for a in self.trainers:
            ray.kill(a)
        if self.trainer_pg is not None:
            ray.util.remove_placement_group(self.trainer_pg)
            self.trainer_pg = None

    def peak_rss_gb(self) -> dict[str, float]:
        """Peak resident memory of every role's process (what `sdft-ray memory --measured` prints beside its budget)."""
        from sdft_ray.modeling import peak_memory_mb

        roles = [(f"trainer{i}", a) for i, a in enumerate(self.trainers)]
        for group, name in ((self.rollouts, "rollout"), (self.teachers, "teacher")):
            roles += [(f"{name}{i}", a) for i, a in enumerate(group.actors if group is not None else [])]
        peaks = self._get([a.peak_memory.remote() for _, a in roles], "peak memory")
        out = {role: p["rss_mb"] * 2**20 / 1e9 for (role, _), p in zip(roles, peaks, strict=True)}
        out["driver"] = peak_memory_mb()["rss_mb"] * 2**20 / 1e9
        return {k: round(v, 2) for k, v in out.items()}
