"""Losing a node: a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``), the trainer on
one node and the vLLM engine on another; the engine's node is killed mid-run.

With a spare node the engine restarts there and gets the current weights (checked by checksum); without one the
run stops with one line naming the lost node, and ``train.resume=auto`` continues once a node is back.

Each case runs in a process of its own (this file as a script): the other tests share one local Ray instance
for the whole session, and a multi-node cluster cannot live beside it in one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, requires_vllm, tiny_overrides

STEPS = 40


def _overrides(tiny: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [
        *tiny_overrides(
            tiny,
            out,
            rollout__backend="vllm",
            rollout__num_cpus=1,
            train__num_cpus=1,
            train__steps=STEPS,
            train__save_every=2,
            rollout__max_new_tokens=16,
            pipeline__max_staleness=0,
            pipeline__verify_weight_checksums=True,
            pipeline__call_timeout_s=120,
        ),
        *extra,
    ]


def _case(tiny: dict[str, str], out: Path, spare: bool) -> dict:
    """Run in the child process: start the cluster, train, kill the engine's node, report what happened."""
    import ray
    from ray.cluster_utils import Cluster

    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver
    from sdft_ray.network import ray_on_loopback

    ray_on_loopback()
    # a dead node is noticed in ~1.5 s instead of Ray's default ~15 s
    fast = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": fast}
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(3 if spare else 2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    d = SDFTDriver(load_config(None, _overrides(tiny, out)))
    result: dict = {}

    def target() -> None:
        try:
            result["summary"] = d.run()
        except Exception as e:  # noqa: BLE001 - reported to the test
            result["error"] = f"{type(e).__name__}: {e}"

    th = threading.Thread(target=target)
    th.start()
    while not (out / "checkpoints" / "step-000002" / "COMPLETE").exists():
        assert th.is_alive(), result
        time.sleep(0.05)
    node_of = lambda actor: ray.get(actor.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id()))
    engine_node, trainer_node = node_of(d.actors.rollouts.actors[0]), node_of(d.actors.trainers[0])
    victim = next(w for w in workers if w.node_id == engine_node)
    cluster.remove_node(victim, allow_graceful=False)  # SIGKILL: raylet, workers, the engine
    th.join(timeout=600)
    d.shutdown()
    report = {
        "engines_node_was_trainers": engine_node == trainer_node,
        "victim": victim.node_ip_address,
        "summary": result.get("summary"),
        "error": result.get("error"),
    }
    if not spare:  # a node comes back, and the user resumes
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        resumed = SDFTDriver(load_config(None, _overrides(tiny, out, "train.resume=auto")))
        try:
            report["resumed"] = resumed.run()
        finally:
            resumed.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return report


def _run_case(tiny: dict[str, str], out: Path, spare: bool) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, json.dumps(tiny), str(out), "spare" if spare else "none"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _events(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@requires_vllm
def test_engine_node_lost_restarts_the_engine_on_a_spare_node(tiny, tmp_path: Path) -> None:
    r = _run_case(tiny, tmp_path, spare=True)
    assert not r["engines_node_was_trainers"]
    assert r["error"] is None, r["error"]
    s = r["summary"]
    assert s["steps"] == STEPS and s["restarts"] == 1
    restarts = [e for e in _events(tmp_path) if e.get("event") == "actor_restart"]
    assert len(restarts) == 1 and restarts[0]["actors"] == ["rollout[0]"]
    assert restarts[0]["lost_nodes"] == [r["victim"]]
    # every sync, the one to the restarted engine included, was checked against the trainer's weights
    assert s["weights_verified"] >= STEPS + 1


@requires_vllm
def test_engine_node_lost_without_a_spare_stops_in_one_line_and_resumes(tiny, tmp_path: Path) -> None:
    r = _run_case(tiny, tmp_path, spare=False)
    assert not r["engines_node_was_trainers"]
    err = r["error"]
    assert err is not None and err.startswith("ActorFailure: node "), err
    assert "was lost at step" in err and "train.resume=auto" in err and "\n" not in err
    assert "needs 2 CPUs" in err  # what the nodes left lack, by the resource check's own words
    resumed = r["resumed"]
    assert resumed["steps"] == STEPS
    starts = [e["step"] for e in _events(tmp_path) if e.get("event") == "start"]
    assert starts[0] == 0 and starts[1] >= 2  # continued from a checkpoint, not from scratch


if __name__ == "__main__":
    tiny_arg, out_arg, mode = sys.argv[1:4]
    print(json.dumps(_case(json.loads(tiny_arg), Path(out_arg), mode == "spare"), default=str))
