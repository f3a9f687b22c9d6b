"""Every socket sdft-ray makes something listen on, and on which address.

One machine (a local run, no RAY_ADDRESS): Ray, the trainers' torch.distributed rendezvous and gloo/NCCL all
listen on 127.0.0.1. On a cluster they listen on the node's address, which the other nodes must reach;
docs/security.md has the table. tests/test_listeners.py lists the sockets of a real run and fails on any
other.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from pathlib import Path


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1, or a dual-stack socket's ::ffff:127.x (which Python 3.11 does not count as loopback)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def ray_on_loopback() -> None:
    """Make the next local ``ray.init`` put the node, and so every Ray listener, on 127.0.0.1.

    Ray (2.60) turns ``_node_ip_address="127.0.0.1"`` into the machine's network address, and its servers then
    listen on all interfaces. Its one-machine mode, the default on macOS and Windows, takes 127.0.0.1 as the
    node address instead, and Ray binds to the node address when that is loopback. The mode is a constant read
    from this variable when ray is imported, hence both lines.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS uses 49152-65535, above it too


def free_address() -> tuple[str, int]:
    """This node's address as Ray knows it (127.0.0.1 on one machine) and a port free on it now.

    The port is chosen below the kernel's ephemeral range: between this probe and the bind that uses it
    (another process, seconds later) only an explicit bind can take it, not one of the outgoing connections
    vLLM and Ray open by the hundred while the actors start. Ray's own worker ports end at 19999.
    """
    import ray

    host = ray.util.get_node_ip_address()
    lo = _ephemeral_range()[0]
    candidates = list(range(20000, lo)) if lo > 20000 else []
    random.shuffle(candidates)
    for port in candidates[:64] + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return host, s.getsockname()[1]
    raise OSError(f"no free port on {host}")


def init_process_group(rank: int, world_size: int, master_addr: str, master_port: int, backend: str) -> int:
    """torch.distributed (what DeepSpeed runs on), its rendezvous store listening on ``master_addr`` alone.

    torch's TCPStore server otherwise listens on every interface: an unauthenticated key-value store on the
    network. Handed a socket bound to the address the other ranks dial, it listens there only.
    ``master_port`` 0 (one rank, nobody else to tell) lets the kernel pick, so no other process can take the
    port between choosing and binding it. Returns the port the store listens on.
    """
    import torch.distributed as dist

    if master_port == 0 and world_size > 1:
        raise ValueError("master_port 0 needs world_size 1: the other ranks must know the port to dial")
    if is_loopback(master_addr):
        # gloo and NCCL pick a network interface of their own for their connections; on one machine, loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    listen_fd = None
    if rank == 0:
        server = socket.create_server((master_addr, master_port))
        master_port = server.getsockname()[1]
        listen_fd = server.detach()  # the store owns the fd now
    store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, master_listen_fd=listen_fd)
    kwargs = {}
    if backend == "nccl":
        import torch

        # NCCL otherwise guesses the GPU from the global rank (it said so on an H200, 2026-12-04), which hangs
        # where ranks and GPUs do not line up; each actor sees its own GPU(s) as cuda:0.. (pin_visible_gpus)
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, **kwargs)
    os.environ["MASTER_PORT"] = str(master_port)
    return master_port
