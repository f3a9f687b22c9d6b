"""A local run listens on loopback only: every socket of a real `sdft-ray train` process tree, listed while it runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import tiny_overrides

from sdft_ray.network import is_loopback

ROOT = Path(__file__).resolve().parents[1]


def _listening(root: psutil.Process) -> set[tuple[str, str, int]]:
    found = set()
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return found
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue  # exited between listing and reading
    return found


def test_local_run_listens_on_loopback_only(tiny, tmp_path: Path) -> None:
    # two trainers: the torch.distributed rendezvous and gloo connect ranks; vLLM when installed
    over = tiny_overrides(
        tiny, tmp_path / "run", train__num_trainers=2, train__num_cpus=0.25, rollout__backend="auto", train__steps=2
    )
    cmd = [sys.executable, "-m", "sdft_ray.cli", "train", "--config", "configs/tiny_cpu.yaml", *over]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    seen: set[tuple[str, str, int]] = set()
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        seen |= _listening(root)
        time.sleep(0.3)
    if proc.poll() is None:
        proc.kill()
    out = proc.communicate()[0]
    assert proc.returncode == 0, out[-3000:]
    names = {name for name, _, _ in seen}
    # the listing saw the run itself: Ray's servers, and the trainers (their rendezvous store)
    assert "gcs_server" in names and "raylet" in names, sorted(seen)
    assert any("StudentTrainer" in n for n in names), sorted(seen)
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_free_address_avoids_the_ephemeral_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port from the ephemeral range can be taken by any outgoing connection before the trainer binds it
    (CI lost a run that way: `Address already in use` at trainer start-up)."""
    import ray

    from sdft_ray.network import _ephemeral_range, free_address

    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "127.0.0.1")  # no cluster needed
    lo, hi = _ephemeral_range()
    ports = {free_address()[1] for _ in range(20)}
    assert all(not lo <= p <= hi for p in ports), (ports, lo, hi)


_ONE_RANK = """
import socket, sys
import torch, torch.distributed as dist
from sdft_ray.network import init_process_group
port = init_process_group(0, 1, "127.0.0.1", 0, "gloo")
t = torch.ones(3)
dist.all_reduce(t)
assert port > 0 and t.tolist() == [1.0, 1.0, 1.0]
with socket.socket() as s:  # the store listens on the port it reported
    s.connect(("127.0.0.1", port))
print(port)
"""


def test_one_rank_binds_a_port_of_the_kernels_choosing() -> None:
    out = subprocess.run([sys.executable, "-c", _ONE_RANK], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) > 0


def test_port_zero_with_several_ranks_is_refused() -> None:
    from sdft_ray.network import init_process_group

    with pytest.raises(ValueError, match="world_size 1"):
        init_process_group(0, 2, "127.0.0.1", 0, "gloo")
