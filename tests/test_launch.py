"""`ray start --head` + `ray job submit` (through launch/submit.sh) on this machine, the way users launch."""

from __future__ import annotations

import json
import os
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
    if shutil.which("ray") is None:
        pytest.fail("the ray CLI is not on PATH (pip install 'ray[default]')")
    dash = _port()
    tmp = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--port",
        str(_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--ray-client-server-port",
        str(_port()),
        "--dashboard-agent-listen-port",
        str(_port()),
        "--metrics-export-port",
        str(_port()),
        "--temp-dir",
        tmp,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # --block + own session: the test can stop exactly this cluster (`ray stop` would stop every cluster here)
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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


def test_ray_job_submit_runs_tiny_job(head_node: str, tiny: dict[str, str], tmp_path: Path) -> None:
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
        str(ROOT / "launch" / "submit.sh"),
        "configs/tiny_cpu.yaml",
        f"model.path={tiny['model']}",
        f"data.train={tiny['train']}",
        "data.eval=",
        f"train.output_dir={out}",
        "logging.progress_bar=false",
        "train.save_every=0",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
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
    listing = subprocess.run(
        ["ray", "job", "list", "--address", head_node],
        env={**env, "RAY_AUTH_MODE": "token"},  # as the README says: Ray's own commands need it
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 0 and "sk-test-NOT-FOR-LOGS-7731" not in listing.stdout + listing.stderr
    assert "sk-test-NOT-FOR-LOGS-7731" not in log and "sk-test-NOT-FOR-LOGS-7731" not in str(events)


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
