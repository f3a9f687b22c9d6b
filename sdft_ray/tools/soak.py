"""The soak: a tiny-model SDFT run with vLLM rollouts, SIGKILLed again and again, resumed each time.

    python -m sdft_ray.tools.soak --out runs/soak --steps 200 --kills 12 --seed 0

Makes the tiny model (``sdft-ray make-tiny``) if ``--out`` has none, trains it once uninterrupted
(``reference/``), then trains it again (``soak/``) while a killer sends SIGKILL at random moments to a rollout
engine (the driver restarts it and the run goes on), the trainer (the run stops; relaunched with
``train.resume=auto``) or the driver with every Ray process it started (relaunched the same way). Some kills
wait for a checkpoint to be half written. Reports every kill (what, when, what was in flight), the steps lost
to each resume, the share of step time spent in weight syncs (the chance a random kill lands in one), and
whether the final student and EMA teacher equal the reference's bit for bit. Writes ``soak.json`` and
``soak.md``. Not part of CI: it takes tens of minutes.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROLES = {"rollout": "ray::RolloutWorker", "trainer": "ray::StudentTrainer"}


def overrides(root: Path, out: Path, steps: int) -> list[str]:
    """The tiny config with vLLM rollouts, on-policy, a checkpoint every 10 steps; fp32 on every CPU, so the
    two runs can be compared bit for bit."""
    tiny = root / "tiny"
    return [
        "--config",
        "configs/tiny_cpu.yaml",
        f"model.path={tiny / 'model'}",
        f"data.train={tiny / 'data' / 'shift_train.jsonl'}",
        "data.eval=",
        "model.dtype=float32",
        "rollout.backend=vllm",
        "rollout.kv_cache_memory_gb=0.25",
        "pipeline.max_staleness=0",
        "pipeline.max_actor_restarts=100",  # the soak counts kills itself; the run should not give up on them
        "pipeline.verify_weight_checksums=true",
        f"train.steps={steps}",
        "train.save_every=10",
        "train.keep_checkpoints=2",
        f"train.output_dir={out}",
        "logging.wandb=disabled",
        "logging.progress_bar=false",
    ]


def _train(args: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own, killed with it
    with log.open("a") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "sdft_ray.cli", "train", *args],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its session holds the driver and every Ray process it starts
        )


def _session_pids(sid: int, prefix: str = "") -> list[int]:
    """Processes of the launch's session whose command starts with ``prefix``: the driver and every Ray process it
    started. By session, not process group: Ray puts each worker in a process group of its own."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getsid(p.info["pid"]) == sid and (p.info["cmdline"] or [""])[0].startswith(prefix):
                found.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return found


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the launch and everything it started, as a lost machine would end them."""
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _lines(out: Path) -> list[str]:
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _last_step(out: Path, since_line: int) -> int | None:
    """The last step this launch logged (its lines start at ``since_line``); None before its first step, so that a
    kill during start-up is not reported at the previous launch's step."""
    steps = [json.loads(x).get("step", 0) for x in _lines(out)[since_line:] if '"loss"' in x]
    return max(steps, default=None)


def _checkpointing(out: Path) -> bool:
    return any((out / "checkpoints").glob(".tmp-step-*")) if (out / "checkpoints").is_dir() else False


def _done(out: Path, steps: int) -> bool:
    return (out / "checkpoints" / f"step-{steps:06d}" / "COMPLETE").exists()


def soak(out: Path, steps: int, kills: int, seed: int, max_wait_s: float = 3.0) -> dict[str, Any]:
    rng = random.Random(seed)
    reference, run = out / "reference", out / "soak"
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tiny" / "model").is_dir():
        from sdft_ray.tools.testbed import make_tiny

        make_tiny(out / "tiny")
    t0 = time.time()
    if not _done(reference, steps):
        proc = _train(overrides(out, reference, steps), out / "reference.log")
        if proc.wait() != 0:
            raise SystemExit(f"the reference run failed: {out / 'reference.log'}")
    reference_s = time.time() - t0

    plan = [rng.choice(["rollout", "rollout", "trainer", "driver"]) for _ in range(kills)]
    for i in range(0, kills, 4):  # every fourth kill waits for a checkpoint in progress
        plan[i] = "checkpoint:" + rng.choice(["trainer", "driver"])
    log, attempts, t1 = [], 0, time.time()
    while not _done(run, steps):
        attempts += 1
        args = overrides(out, run, steps) + (["train.resume=auto"] if attempts > 1 else [])
        first_line = len(_lines(run))
        proc = _train(args, out / "soak.log")
        while proc.poll() is None and plan:
            target = plan[0]
            # the pause counts from this launch's first trained step: a tiny model's 200 steps take under a
            # minute, less than a launch's start-up, so a clock started at launch would mostly hit start-ups
            while proc.poll() is None and _last_step(run, first_line) is None:
                time.sleep(0.05)
            waited, deadline = False, time.time() + rng.uniform(0.5, max_wait_s)
            while proc.poll() is None and time.time() < deadline:
                if target.startswith("checkpoint:") and _checkpointing(run):
                    waited = True
                    break
                time.sleep(0.005)  # a tiny checkpoint is on disk for ~20 ms
            if proc.poll() is not None or (target.startswith("checkpoint:") and not waited):
                continue  # finished, or no checkpoint began before the deadline: try again
            role = target.removeprefix("checkpoint:")
            entry = {
                "attempt": attempts,
                "target": role,
                "at_step": _last_step(run, first_line),
                "checkpoint": _checkpointing(run),
            }
            if role == "driver":
                _kill_session(proc)
            else:
                pids = _session_pids(proc.pid, ROLES[role])
                if not pids:
                    continue  # not started yet, or between restarts
                os.kill(rng.choice(pids), signal.SIGKILL)
            entry["t"] = round(time.time() - t1, 1)
            log.append(entry)
            plan.pop(0)
        code = proc.wait()
        _kill_session(proc)  # what a failed driver left behind
        if log and log[-1]["attempt"] == attempts:
            log[-1]["run_exit"] = code
        if attempts > 5 * kills + 5:
            raise SystemExit(f"{attempts} attempts and the soak run has not finished: {out / 'soak.log'}")
    result = _report(out, reference, run, steps, kills, log, attempts, reference_s, time.time() - t1)
    (out / "soak.json").write_text(json.dumps(result, indent=1))
    (out / "soak.md").write_text(_markdown(result))
    return result


def _report(
    out: Path,
    reference: Path,
    run: Path,
    steps: int,
    kills: int,
    log: list[dict],
    attempts: int,
    ref_s: float,
    soak_s: float,
) -> dict[str, Any]:
    from safetensors.torch import load_file

    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    starts = [e["step"] for e in events if e.get("event") == "start"]
    rows = [e for e in events if "loss" in e]
    restarts = [e for e in events if e.get("event") == "actor_restart"]
    # steps logged more than once were trained again after a resume: the steps a kill cost
    lost = len(rows) - len({r["step"] for r in rows})
    sync_share = sum(r.get("weight_sync_s", 0.0) for r in rows) / max(1e-9, sum(r.get("step_s", 0.0) for r in rows))
    equal: dict[str, bool] = {}
    final = f"step-{steps:06d}"
    for part in ("student", "teacher"):
        a = load_file(str(reference / "checkpoints" / final / part / "model.safetensors"))
        b = load_file(str(run / "checkpoints" / final / part / "model.safetensors"))
        equal[part] = a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    return {
        "steps": steps,
        "kills": log,
        "kills_survived": len(log),
        "kills_planned": kills,
        "by_target": {t: sum(e["target"] == t for e in log) for t in ("rollout", "trainer", "driver")},
        "during_checkpoint": sum(e["checkpoint"] for e in log),
        "attempts": attempts,
        "resumed_from_steps": starts[1:],
        "engine_restarts_logged": len(restarts),
        "steps_trained_again": lost,
        "weight_sync_share_of_step_time": round(sync_share, 4),
        "final_weights_equal_reference": equal,
        "reference_s": round(ref_s),
        "soak_s": round(soak_s),
        "machine": _machine(),
    }


def _machine() -> str:
    from sdft_ray.precision import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} CPUs"


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"Soak: {r['steps']} steps, {r['kills_survived']} SIGKILLs survived of {r['kills_planned']} planned (the run "
        f"ends the plan when it finishes first; {r['by_target']}; "
        f"{r['during_checkpoint']} during a checkpoint), {r['attempts']} launches, resumed from steps "
        f"{r['resumed_from_steps']}, {r['steps_trained_again']} steps trained again, {r['engine_restarts_logged']} "
        f"engine restarts logged; weight syncs are {100 * r['weight_sync_share_of_step_time']:.1f}% of step time. "
        f"Final weights equal to the uninterrupted run: {r['final_weights_equal_reference']}. "
        f"Reference {r['reference_s']} s, soak {r['soak_s']} s, {r['machine']}.",
        "",
        "| # | launch | target | at step (- = starting) | checkpoint in flight | t (s) | run exit |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, e in enumerate(r["kills"], 1):
        lines.append(
            f"| {i} | {e['attempt']} | {e['target']} | {'-' if e['at_step'] is None else e['at_step']} | "
            f"{e['checkpoint']} | {e['t']} | "
            f"{e.get('run_exit', '')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        description="SIGKILL a tiny SDFT run again and again; compare with an uninterrupted one"
    )
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--kills", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--max-wait",
        type=float,
        default=3.0,
        help="longest pause (s) from a launch's first step or the last kill to the next kill",
    )
    a = ap.parse_args(argv)
    print(_markdown(soak(Path(a.out), a.steps, a.kills, a.seed, a.max_wait)))


if __name__ == "__main__":
    main()
