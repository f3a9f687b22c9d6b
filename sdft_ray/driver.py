"""The driver: one controller wiring rollout, teacher and trainer actors into a pipelined SDFT loop.

Per step (docs/algorithm.md): rollout (student samples y) -> teacher scores y under the demonstration prompt ->
trainer takes the divergence loss and an optimizer step (+ EMA teacher) -> new weights go to the engines.
Rollouts for the next ``pipeline.max_staleness`` steps are launched before the current step trains, so
generation overlaps training; each sample carries the weight version it was generated with.
Only ObjectRefs pass through here: completions go rollout -> trainer, weights trainer -> engines.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdft_ray import checkpoint as ckpt
from sdft_ray.cluster import ActorGroup, actor_runtime_env, check_resources, init_ray, is_dead, trainer_bundles
from sdft_ray.config import Config
from sdft_ray.data import LoadReport, PromptSampler, load_examples, tokenize_examples
from sdft_ray.ds_config import samples_per_step
from sdft_ray.errors import ActorFailure, CheckpointError, WeightSyncError, WeightSyncTimeout
from sdft_ray.metrics import MetricsLogger
from sdft_ray.modeling import load_tokenizer
from sdft_ray.network import free_address

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    step: int
    items: list[dict[str, Any]]
    rollout_refs: list[Any]
    teacher_refs: list[Any]
    engine_loads: list[tuple[int, int]] = field(default_factory=list)  # (engine, prompts) still in flight


class SDFTDriver:
    def __init__(self, cfg: Config, dry_run: bool = False) -> None:
        """Checks everything that can fail before a Ray actor starts: config, data, tokenizer, output folder,
        resume point. ``dry_run``: the same checks without creating or deleting anything (see ``plan``)."""
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model)
        self.report = LoadReport()
        examples = load_examples(cfg.data, report=self.report)
        self.data = tokenize_examples(examples, self.tokenizer, cfg.data, self.report)
        if cfg.train.algo == "sft" and any(not d.demonstration_ids for d in self.data):
            raise ValueError(f"{cfg.data.train}: train.algo=sft needs a demonstration in every record")
        self.sampler = PromptSampler(len(self.data), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
        t = cfg.train
        self.total_steps = t.steps or t.epochs * self.sampler.steps_per_epoch()
        self.step = 0
        self.version = 0
        self.pending_syncs: list[Any] = []
        self.pending_checks: list[Any] = []
        self.pending_sends: list[Any] = []
        self.last_sync_s = 0.0
        self.weights_verified = 0
        self.resume_from = ckpt.prepare_output(t.output_dir, t.resume, t.overwrite, dry_run)  # before any actor
        if self.resume_from is not None:
            self.check_resume_config(self.resume_from)
        # set before any actor starts, so shutdown() after a failed start reports the failure, not itself
        self.rollouts: ActorGroup | None = None
        self.teachers: ActorGroup | None = None
        self.trainers: list[Any] = []
        self.trainer_pg: Any = None

    def plan(self) -> dict[str, Any]:
        """What ``run`` would do, for ``sdft-ray train --dry-run``: nothing is started, written or deleted."""
        cfg, t = self.cfg, self.cfg.train
        start = int(ckpt.read_driver_state(self.resume_from)["step"]) if self.resume_from else 0
        out: dict[str, Any] = {
            "algo": t.algo,
            "model": cfg.model.path,
            "data": {"file": cfg.data.train, **vars(self.report)},
            "steps": self.total_steps,
            "start_step": start,
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "samples_per_step": samples_per_step(cfg),
            "rollout": f"{cfg.rollout.backend} x {cfg.rollout.num_engines}" if cfg.runs_rollout_engines else None,
            "teacher": f"{cfg.teacher.kind}, {'in the trainer' if cfg.teacher_colocated else 'separate actors'}",
            "trainers": t.num_trainers,
            "weight_transport": cfg.weight_transport,
            "output_dir": t.output_dir,
        }
        if t.overwrite and self.resume_from is None and ckpt.complete_checkpoints(t.output_dir):
            out["would_delete"] = str(ckpt.checkpoint_root(t.output_dir))
        return out

    # ------------------------------------------------------------ actors
    def start_actors(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.rollout import RolloutWorker
        from actors.teacher import TeacherWorker
        from actors.trainer import StudentTrainer

        cfg, raw = self.cfg, self.cfg.to_dict()
        t, r, te = cfg.train, cfg.rollout, cfg.teacher
        env = actor_runtime_env(t.torch_threads)
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
        self.engine_load = [0] * r.num_engines
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
        if cfg.weight_transport == "nccl" and self.rollouts is not None:
            # after every member is up: the group's rendezvous waits only a few minutes for stragglers
            self._init_gpu_weight_group()

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

    def _get(self, refs: Any, what: str, timeout: float | None = None, error: type = ActorFailure) -> Any:
        """ray.get with a deadline; a timeout raises ``error`` (WeightSyncTimeout for syncs, which recover)."""
        import ray

        timeout = timeout or self.cfg.pipeline.call_timeout_s
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            setting = "pipeline.sync_timeout_s" if error is WeightSyncTimeout else "pipeline.call_timeout_s"
            raise error(
                f"{what}: no answer within {timeout:.0f}s ({setting}); the run stops instead of hanging"
            ) from None

    # ------------------------------------------------------------ weights
    def sync_weights(self, targets: list[tuple[Any, str]] | None = None) -> None:
        """Send the trainer's current weights to every rollout engine (and separate teacher).

        Calls are queued on each actor behind rollouts already launched, which therefore keep the
        older version: that is the bounded staleness, not a race.
        """
        p = self.cfg.pipeline
        if targets is None:
            targets = [(a, "student") for a in (self.rollouts.actors if self.rollouts else [])]
            kind = self.cfg.teacher.kind
            if self.teachers is not None and kind in ("ema", "student"):
                targets += [(a, "teacher" if kind == "ema" else "student") for a in self.teachers.actors]
        gpu = self.cfg.weight_transport in ("nccl", "ipc") and self.rollouts is not None
        if gpu:
            engines = set(self.rollouts.actors)
            self._sync_engines_gpu([a for a, _ in targets if a in engines])
            targets = [(a, w) for a, w in targets if a not in engines]  # separate teachers: object store
            if not targets:
                return
        for which in dict.fromkeys(w for _, w in targets):  # each source once, in order
            receivers = [a for a, w in targets if w == which]
            if p.verify_weight_checksums:  # queued on the trainer before any later step: this version's weights
                expected = [tr.checksum.remote(which) for tr in self.trainers][0]
            self._stream_buckets(which, receivers)
            # queued behind the update on each actor, so it reads the weights just received
            if p.verify_weight_checksums:
                self.pending_checks += [(a.checksum.remote(), expected, a) for a in receivers]

    def _stream_buckets(self, which: str, receivers: list[Any]) -> None:
        """Object-store sync, bucket by bucket: the trainer publishes bucket i, every receiver loads it, and at
        most ``pipeline.sync_inflight_buckets`` buckets exist in the object store at once (0 = no bound: every
        bucket is queued at once and the receivers load them when they get to it, so the driver never waits,
        but the whole model sits in the object store). All calls come from this driver, so each receiver runs
        them in order, before any rollout launched after this sync."""
        p = self.cfg.pipeline
        n = self._get(self.trainers[0].num_buckets.remote(which), "weight sync plan")
        inflight: deque[list[Any]] = deque()
        for i in range(n):
            published = [tr.publish_bucket.remote(which, i) for tr in self.trainers]  # collective under ZeRO-3
            acks = [a.receive_bucket.remote(published[0], i == n - 1, self.version) for a in receivers]
            inflight.append(published[1:] + acks)
            while p.sync_inflight_buckets and len(inflight) > p.sync_inflight_buckets:
                self._get(inflight.popleft(), "weight sync", p.sync_timeout_s, WeightSyncTimeout)
        # the tail (or everything, unbounded) is waited for in wait_syncs; += : GPU syncs may have queued some
        self.pending_syncs += [ref for refs in inflight for ref in refs]

    def _sync_engines_gpu(self, engines: list[Any]) -> None:
        """vLLM engines: NCCL broadcast (engines receive while the trainer sends) or CUDA IPC bucket by bucket."""
        if not hasattr(self, "_plan"):
            self._plan = self._get(self.trainers[0].sync_plan.remote(), "sync plan")
        if self.cfg.weight_transport == "nccl":
            sends = [tr.send_nccl.remote() for tr in self.trainers]
            self.pending_syncs += [e.receive_nccl.remote(self._plan, self.version) for e in engines]
            self.pending_sends = sends
            return
        t0 = time.perf_counter()
        for i, meta in enumerate(self._plan):
            handles = [tr.ipc_bucket.remote(i) for tr in self.trainers][0]
            self._get(
                [e.receive_ipc.remote(handles, meta) for e in engines],
                "ipc weight sync",
                self.cfg.pipeline.sync_timeout_s,
                WeightSyncTimeout,
            )
        self._get([tr.ipc_done.remote() for tr in self.trainers], "ipc weight sync")
        self._get([e.finish_update.remote(self.version) for e in engines], "ipc weight sync")
        self.last_sync_s = time.perf_counter() - t0

    def _init_gpu_weight_group(self) -> None:
        r = self.cfg.rollout
        world = 1 + r.num_engines * r.tensor_parallel_size
        host, port = self._get(self.trainers[0].free_address.remote(), "NCCL weight group setup")
        refs = [tr.init_weight_group.remote(host, port, world) for tr in self.trainers]
        refs += [
            e.init_weight_group.remote(host, port, 1 + i * r.tensor_parallel_size, world)
            for i, e in enumerate(self.rollouts.actors)
        ]
        self._get(refs, "NCCL weight group setup", self.cfg.pipeline.sync_timeout_s, WeightSyncTimeout)

    def wait_syncs(self) -> None:
        """Block until the last sync landed; with verify_weight_checksums, prove receivers equal the trainer."""
        if not self.pending_syncs:
            return
        p = self.cfg.pipeline
        done = self._get(self.pending_syncs, "weight sync", p.sync_timeout_s + p.call_timeout_s, WeightSyncTimeout)
        if self.pending_sends:
            self._get(self.pending_sends, "weight send", p.sync_timeout_s, WeightSyncTimeout)
            self.pending_sends = []
        self.last_sync_s = max((d["seconds"] for d in done if d), default=0.0)  # publish_bucket on ranks > 0: None
        self.pending_syncs = []
        for got, want, actor in self.pending_checks:
            got, want = self._get([got, want], "weight checksum")
            if got != want:
                raise WeightSyncError(f"weights at {actor} differ from the trainer's after sync v{self.version}")
            self.weights_verified += 1
        self.pending_checks = []

    # ------------------------------------------------------------ rollouts
    def make_items(self, step: int) -> list[dict[str, Any]]:
        items = []
        for j, idx in enumerate(self.sampler.batch(step)):
            ex = self.data[idx]
            for k in range(self.cfg.rollout.num_rollouts if self.cfg.train.algo == "sdft" else 1):
                items.append(
                    {
                        "uid": f"{step}-{j}-{k}",
                        "index": ex.index,
                        "prompt_ids": ex.prompt_ids,
                        "teacher_prompt_ids": ex.teacher_prompt_ids,
                        "demonstration_ids": ex.demonstration_ids,
                    }
                )
        return items

    def launch(self, step: int, items: list[dict[str, Any]] | None = None) -> InFlight:
        import ray

        items = items or self.make_items(step)
        if self.cfg.train.algo == "sft":
            return InFlight(step, items, [ray.put(items)], [])
        engines = self.rollouts.actors
        shards = self.assign(len(items))
        seed = self.cfg.train.seed * 1_000_003 + step
        refs, loads = [], []
        for e, idx in enumerate(shards):
            if idx:
                refs.append(engines[e].generate.remote([items[i] for i in idx], seed * 131 + e))
                loads.append((e, len(idx)))
                self.engine_load[e] += len(idx)
        teacher_refs = []
        if self.teachers is not None:
            n = len(self.teachers.actors)
            teacher_refs = [t.score.remote(refs[i::n]) for i, t in enumerate(self.teachers.actors) if refs[i::n]]
        return InFlight(step, items, refs, teacher_refs, loads)

    def assign(self, n: int) -> list[list[int]]:
        """Least-loaded dispatch: each prompt goes to the engine with the fewest prompts in flight.

        Equal engines with equal queues get an even split; an engine that was just restarted (empty queue)
        or one still busy with a lagging batch gets more or fewer accordingly.
        """
        load = list(self.engine_load)
        shards: list[list[int]] = [[] for _ in load]
        for i in range(n):
            e = min(range(len(load)), key=lambda k: (load[k], k))
            shards[e].append(i)
            load[e] += 1
        return shards

    def done_with(self, batch: InFlight) -> None:
        for e, n in batch.engine_loads:
            self.engine_load[e] -= n

    # ------------------------------------------------------------ faults
    def recover(self, batch_queue: deque[InFlight], err: Exception) -> None:
        """A step failed: restart dead rollout/teacher actors, resend weights, relaunch in-flight rollouts."""
        dead_trainers = [i for i, a in enumerate(self.trainers) if is_dead(a)]
        if dead_trainers:
            raise ActorFailure(
                f"trainer rank(s) {dead_trainers} died at step {self.step} ({type(err).__name__}). Trainer state is "
                f"not replicated; rerun with train.resume=auto to continue from the last checkpoint."
            ) from err
        restarted = []
        for group, name in ((self.rollouts, "rollout"), (self.teachers, "teacher")):
            if group is None:
                continue
            for i in group.dead():
                if group.restarts >= self.cfg.pipeline.max_actor_restarts:
                    raise ActorFailure(
                        f"{name} actor {i} died again after {group.restarts} restarts "
                        f"(pipeline.max_actor_restarts); giving up"
                    ) from err
                group.restart(i)
                restarted.append(f"{name}[{i}]")
        if not restarted:
            raise err
        log.warning("restarted %s after %s; resending weights v%d", restarted, type(err).__name__, self.version)
        self.logger.event("actor_restart", step=self.step, actors=restarted, error=str(err)[:500])
        self.pending_syncs, self.pending_checks = [], []
        self.sync_weights()
        self.wait_syncs()
        steps = [b.step for b in batch_queue]
        for b in batch_queue:
            self.done_with(b)
        batch_queue.clear()
        for s in steps:
            batch_queue.append(self.launch(s))

    def check_engine_weights(self, results: list[dict[str, Any]]) -> None:
        """Stop when the engines did not sample from the trainer's weights: a sync that never arrived (the
        engine reports an old version) or one that arrived without its weights (the log-probs disagree).

        The gap is judged on on-policy steps only: with staleness the lag itself legitimately widens it.
        """
        p = self.cfg.pipeline
        lag = max(r["lag_max"] for r in results)
        if lag > p.max_staleness:  # the engine says which version it sampled with: a sync never landed
            raise WeightSyncError(
                f"step {self.step}: rollouts were sampled with weights {lag} versions old (pipeline.max_staleness="
                f"{p.max_staleness}): a weight sync did not reach the engine. The run stops; train.resume=auto "
                "continues from the last checkpoint"
            )
        limit = p.max_logprob_gap
        if self.cfg.train.algo != "sdft" or not limit or lag:
            return
        gap = max(r["logprob_gap"] for r in results)
        if gap > limit:
            raise WeightSyncError(
                f"step {self.step}: the rollout engine's log-probs of its own samples differ from the trainer's by "
                f"{gap:.3f} per token (pipeline.max_logprob_gap={limit:g}): the engine is not sampling from the "
                f"trainer's weights v{self.version - 1}. The run stops; train.resume=auto continues from the last "
                "checkpoint"
            )

    # ------------------------------------------------------------ checkpoints
    def save(self) -> None:
        tmp: Path | None = None
        try:
            tmp = ckpt.temp_dir(self.cfg.train.output_dir, self.step)
            self._get([tr.save.remote(str(tmp)) for tr in self.trainers], "checkpoint save")
            state = {
                "step": self.step,
                "version": self.version,
                "sampler_position": self.step,
                "total_steps": self.total_steps,
                "time": time.time(),
                "config": self.cfg.to_dict(),  # what a resume compares itself with
            }
            final = ckpt.finalize(tmp, self.step, state, self.cfg.train.keep_checkpoints)
        except Exception as e:
            err = ckpt.disk_error(e, self.cfg.train.output_dir)
            if err is None:
                raise
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # never marked complete: the last good one stays newest
            last = ckpt.complete_checkpoints(self.cfg.train.output_dir)
            kept = f"{last[-1].name} is intact" if last else "no earlier checkpoint exists"
            raise CheckpointError(
                f"{err} while writing checkpoint step {self.step} under {self.cfg.train.output_dir}; {kept}. "
                "Free space, then rerun with train.resume=auto"
            ) from None
        self.logger.event("checkpoint", step=self.step, path=str(final))

    def check_resume_config(self, path: Path) -> None:
        """Name every setting that differs from the checkpoint's; refuse those that change the run's math."""
        saved = ckpt.read_driver_state(path).get("config")
        if saved is None:
            log.warning("sdft-ray: %s holds no config (an older checkpoint): resuming without comparing", path)
            return
        safe, unsafe = ckpt.config_changes(saved, self.cfg.to_dict())
        if safe:
            print(f"sdft-ray: resuming with changed settings: {'; '.join(safe)}", file=sys.stderr, flush=True)
        if unsafe and not self.cfg.train.allow_config_change:
            raise CheckpointError(
                f"{path} was trained with other settings: {'; '.join(unsafe)}. Resuming would mix two runs; "
                "use the checkpoint's settings, or add train.allow_config_change=true to resume anyway"
            )
        if unsafe:
            print(f"sdft-ray: resuming with CHANGED run settings: {'; '.join(unsafe)}", file=sys.stderr, flush=True)

    def restore(self) -> None:
        path = self.resume_from
        if path is None:
            return
        state = ckpt.read_driver_state(path)
        versions = self._get([tr.load.remote(str(path)) for tr in self.trainers], "checkpoint load")
        self.step, self.version = int(state["step"]), int(versions[0])
        log.warning("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        import ray

        cfg = self.cfg
        self.start_actors()
        self.restore()
        self.logger = MetricsLogger(cfg, self.total_steps, self.step)
        forwarded = sorted(k for k in os.environ if k.startswith(("WANDB_", "HF_", "NCCL_", "SDFT_")))
        self.logger.event(
            "start", step=self.step, total_steps=self.total_steps, data=vars(self.report), env_names=forwarded
        )
        if self.rollouts is not None and (cfg.train.algo == "sdft" or self.step > 0):
            self.sync_weights()  # engines load the base model; after a resume they need the restored weights
        queue: deque[InFlight] = deque()
        next_launch = self.step
        t_start = time.perf_counter()
        last: dict[str, Any] = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            while len(queue) <= cfg.pipeline.max_staleness and next_launch < self.total_steps:
                queue.append(self.launch(next_launch))
                next_launch += 1
            try:
                self.wait_syncs()
                batch = queue[0]
                results = self._get(
                    [tr.train_step.remote(batch.rollout_refs, batch.teacher_refs) for tr in self.trainers],
                    f"train step {self.step}",
                )
            except (ray.exceptions.RayError, WeightSyncTimeout) as err:  # other ActorFailures (timeouts) stop
                self.recover(queue, err)
                continue
            self.done_with(queue.popleft())
            self.step += 1
            self.version = results[0]["version"]
            self.check_engine_weights(results)
            if self.rollouts is not None and cfg.train.algo == "sdft":
                try:  # a bounded sync blocks on its receivers, so a death here is met here, not in the next step
                    self.sync_weights()
                except (ray.exceptions.RayError, WeightSyncTimeout) as err:
                    self.recover(queue, err)  # resends this version to the restarted engine
            last = self._step_metrics(results, time.perf_counter() - t0)
            self.logger.completions(self.step, results[0]["completions"])
            if self.step % cfg.logging.log_every == 0 or self.step == self.total_steps:
                self.logger.log(self.step, last)
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save()
        self.wait_syncs()
        self.save()
        summary = {
            "steps": self.step,
            "wall_s": time.perf_counter() - t_start,
            "last": last,
            "restarts": sum(g.restarts for g in (self.rollouts, self.teachers) if g is not None),
            "skipped_records": self.report.skipped,
            "weights_verified": self.weights_verified,
        }
        summary["peak_rss_gb"] = self.peak_rss_gb()
        if cfg.data.eval and self.rollouts is not None:
            from sdft_ray.evaluate import evaluate_with_engines

            if cfg.train.algo != "sdft":  # SDFT engines already hold the final weights (synced after each step)
                self.sync_weights()
                self.wait_syncs()
            summary["eval"] = evaluate_with_engines(cfg, self.tokenizer, self.rollouts.actors, cfg.data.eval)
            scalars = {f"eval/{k}": v for k, v in summary["eval"].items() if not isinstance(v, (list, dict))}
            self.logger.log(self.step, scalars)
        self.logger.event("end", **{k: v for k, v in summary.items() if k != "last"})
        self.logger.close()
        return summary

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

    def _step_metrics(self, results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
        m = {k: v for k, v in results[0].items() if k != "completions"}
        if len(results) > 1:
            for k in ("loss", "kl", "importance_weight", "lag_mean", "completion_len", "clipped_ratio", "logprob_gap"):
                m[k] = sum(r[k] for r in results) / len(results)
            m["tokens"] = sum(r["tokens"] for r in results)
        m["step_s"] = wall
        m["weight_sync_s"] = self.last_sync_s  # the sync that fed this step's rollouts
        m["weights_verified"] = self.weights_verified
        m["tokens_per_s"] = m["tokens"] / max(wall, 1e-9)
        m["samples"] = samples_per_step(self.cfg)
        return m


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job end to end (starting Ray if needed); returns a summary."""
    driver = SDFTDriver(cfg)  # data and model folder checked before Ray starts: bad input fails in seconds
    init_ray()
    try:
        return driver.run()
    finally:
        driver.shutdown()
