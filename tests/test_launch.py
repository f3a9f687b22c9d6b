"""`ray start --head` + `ray job submit` (through launch/submit.sh) on this machine, the way users launch."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


@pytest.fixture
def head_node():
    """A head started by launch/start_head.sh, as docs/clusters.md says, on free ports and in its own session."""
    if shutil.which("ray") is None:
        pytest.fail("the ray CLI is not on PATH (pip install 'ray[default]')")
    dash = _port()
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    extra = ["--block", "--temp-dir", tmp]  # --block: the test stops exactly this cluster, not every one here
    for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port", "--metrics-export-port"):
        extra += [flag, str(_port())]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_PORT=str(_port()), DASHBOARD_PORT=str(dash), NUM_CPUS="2")
    head = subprocess.Popen(
        [str(ROOT / "launch" / "start_head.sh"), *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", dash), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None and time.time() < deadline, "ray head did not come up"
            time.sleep(0.5)
    yield address
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(tmp, ignore_errors=True)


def _clone_with_tiny(tiny: dict[str, str], dest: Path) -> Path:
    """This checkout's files (what a clone has, plus uncommitted ones) and the embedded tiny model and data
    where `sdft-ray make-tiny --out tiny` puts them: git-ignored, yet the job needs them uploaded."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    shutil.copytree(tiny["model"], dest / "tiny" / "model")
    (dest / "tiny" / "data").mkdir()
    shutil.copy(tiny["train"], dest / "tiny" / "data" / "shift_train.jsonl")
    shutil.copy(tiny["eval"], dest / "tiny" / "data" / "shift_eval.jsonl")
    return dest


def test_readme_cluster_flow_runs_tiny_job(head_node: str, tiny: dict[str, str], tmp_path: Path) -> None:
    """docs/clusters.md: start_head.sh, submit.sh with the tiny config as shipped (its model and data
    uploaded with the job), `ray job logs`; secrets in the shell reach no job metadata."""
    repo = _clone_with_tiny(tiny, tmp_path / "repo")
    out = tmp_path / "run"
    env = {
        **os.environ,
        "RAY_DASHBOARD_ADDRESS": head_node,
        "SDFT_OVERRIDES": "train.steps=2",
        "WANDB_MODE": "disabled",
        "WANDB_API_KEY": "sk-test-NOT-FOR-LOGS-7731",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        "launch/submit.sh",
        "configs/tiny_cpu.yaml",
        f"train.output_dir={out}",
        "logging.progress_bar=false",
        "train.save_every=0",
    ]
    res = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0 and "succeeded" in log, log[-4000:]
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # env from the submitting shell reached the job: SDFT_OVERRIDES set the step count, and it was forwarded
    assert [e["step"] for e in events if "loss" in e] == [1, 2]
    start = next(e for e in events if e.get("event") == "start")
    assert "SDFT_OVERRIDES" in start["env_names"] and "WANDB_MODE" in start["env_names"]
    assert (out / "checkpoints" / "step-000002" / "COMPLETE").exists()
    # the secret in the submitting shell is named as not forwarded, and appears in no job metadata
    assert "not forwarding WANDB_API_KEY" in res.stderr
    ray_env = {**env, "RAY_AUTH_MODE": "token"}  # as docs/clusters.md says: Ray's own commands need it
    listing = subprocess.run(
        ["ray", "job", "list", "--address", head_node], env=ray_env, capture_output=True, text=True, timeout=120
    )
    assert listing.returncode == 0 and "sk-test-NOT-FOR-LOGS-7731" not in listing.stdout + listing.stderr
    assert "sk-test-NOT-FOR-LOGS-7731" not in log and "sk-test-NOT-FOR-LOGS-7731" not in str(events)
    job_id = re.search(r"Job '([^']+)' submitted successfully", log).group(1)
    logs = subprocess.run(
        ["ray", "job", "logs", job_id, "--address", head_node], env=ray_env, capture_output=True, text=True, timeout=120
    )
    assert logs.returncode == 0 and "sdft-ray" in logs.stdout, logs.stdout[-2000:] + logs.stderr[-2000:]


def test_actors_see_only_their_gpus_when_ray_does_not_set_them() -> None:
    from actors.base import visible_devices

    noset = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    assert visible_devices(noset, ["2", "3"]) == "2,3"
    assert visible_devices(noset, []) is None  # a CPU actor: nothing to pin
    assert visible_devices({"CUDA_VISIBLE_DEVICES": "1"}, ["1"]) is None  # Ray already set it
    assert visible_devices({"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "0"}, ["1"]) is None


def test_runtime_env_forwards_only_known_prefixes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_env", ROOT / "launch" / "runtime_env.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    env, secrets = mod.runtime_env(
        str(ROOT / "launch" / "runtime_env.yaml"),
        {
            "WANDB_MODE": "online",
            "HF_HOME": "/data/hf",
            "HF_TOKEN": "x",
            "WANDB_API_KEY": "k",
            "AWS_SECRET_ACCESS_KEY": "no",
            "PATH": "/bin",
            "CUDA_VISIBLE_DEVICES": "0",
        },
    )
    assert env["env_vars"]["WANDB_MODE"] == "online" and env["env_vars"]["HF_HOME"] == "/data/hf"
    # secrets never go into job metadata (readable by anyone who can list jobs, and logged by Ray)
    assert secrets == ["HF_TOKEN", "WANDB_API_KEY"] and not set(secrets) & set(env["env_vars"])
    assert "CUDA_VISIBLE_DEVICES" not in env["env_vars"]  # Ray owns it per actor
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and "PATH" not in env["env_vars"]
    assert ".git" in env["excludes"]


def test_gpu_proof_job_plumbing_runs_on_cpu(tiny, ray_cluster, tmp_path: Path) -> None:
    """launch/gpu_proof.py's job runner, on CPU: what it reads (summary, steps, memory) exists. Its GPU checks
    themselves (IPC, NCCL, sleep/wake, bf16 ZeRO) run only on a GPU machine."""
    import importlib.util

    from conftest import tiny_overrides

    spec = importlib.util.spec_from_file_location("gpu_proof", ROOT / "launch" / "gpu_proof.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    over = tiny_overrides(tiny, tmp_path / "run", pipeline__verify_weight_checksums=True)
    res = mod.run_job(over, steps=2)
    assert res["summary"]["weights_verified"] == 3 and len(res["steps"]) == 2
    assert all("weight_sync_s" in r and r["skipped_step"] == 0 for r in res["steps"])
    assert res["memory"]["trainer_peak"]["rss_mb"] > 0 and "free_mb_engine_asleep" in res["memory"]
