"""The errors a user can cause or meet, each printed by the CLI as one line (no traceback).

They live here, free of heavy imports, so the CLI can name them without loading torch or Ray first.
"""

from __future__ import annotations

import errno
import re

ROLES = {"StudentTrainer": "trainer", "RolloutWorker": "rollout engine", "TeacherWorker": "teacher actor"}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise page-long ones), or its type if it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def memory_kill(e: BaseException) -> str | None:
    """One line for a process Ray's memory monitor killed, read from Ray's page-long message; None otherwise.

    Names the role (from the killed task's actor class), what it held and what the node had, and what to change.
    """
    text = str(e)
    if type(e).__name__ != "OutOfMemoryError" and "killed due to the node running low on memory" not in text:
        return None
    victim = re.search(r"Selected to kill:.*?task name=([\w.]+).*?actual memory used=([\d.]+GB)", text, re.S)
    node = re.search(r"was ([\d.]+GB) used / ([\d.]+GB) limit", text)
    if victim:
        role = ROLES.get(victim.group(1).split(".")[0], victim.group(1).split(".")[0])
        who = f"killed the {role} ({victim.group(1)}, holding {victim.group(2)})"
    else:
        who = "killed a process"
    where = f"; the node had {node.group(1)} of {node.group(2)} in use" if node else ""
    return (
        f"out of memory: Ray's memory monitor {who}{where}. Compare with `sdft-ray memory --config ...`, then lower "
        "train.micro_batch_size, rollout.kv_cache_memory_gb or pipeline.sync_inflight_buckets, or use fewer "
        "engines or a smaller model; train.resume=auto continues from the last complete checkpoint"
    )


class DataError(ValueError):
    """A dataset or record is unusable; the message names the file, the record and the field."""


class ModelError(ValueError):
    """A model folder that cannot be loaded; the message names the path or file and what to do."""


class ActorFailure(RuntimeError):
    """An actor died or a remote call timed out and the run cannot continue; the message says what to do."""


class WeightSyncTimeout(ActorFailure):
    """A receiver did not take a weight bucket within pipeline.sync_timeout_s: the driver restarts dead engines."""


class WeightSyncError(RuntimeError):
    """Weights arrived corrupted or incomplete. The run must not go on with unknown weights."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss; the run stops before corrupting weights."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (damaged, or would run code), or an output folder already in use."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill), turned into the same clean stop as Ctrl-C."""


def stop_on_signals() -> None:
    """SIGTERM raises ``Stopped`` in the main thread, Ctrl-C ``KeyboardInterrupt``: a clean stop (actors stopped,
    the last checkpoint kept). From the first signal on, a second one of either kind exits at once, skipping the
    cleanup: a user who presses Ctrl-C twice is never kept waiting. Call after ``ray.init``, which installs a
    SIGTERM handler of its own."""
    import os
    import signal
    import threading

    def now(signum: int, frame: object) -> None:
        os.write(2, b"sdft-ray: second signal: exiting now, without cleanup; complete checkpoints are kept\n")
        _kill_descendants()  # Ray's agents outlive their driver unless told; checkpoints are whole or absent
        os._exit(130)

    def first(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, now)
        signal.signal(signal.SIGTERM, now)
        os.write(2, b"sdft-ray: stopping cleanly (a second Ctrl-C or SIGTERM exits at once)\n")
        if signum == signal.SIGTERM:
            raise Stopped("SIGTERM")
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, first)
        signal.signal(signal.SIGINT, first)


def _kill_descendants() -> None:
    """SIGKILL every process this one started, grandchildren included (Linux /proc; elsewhere nothing)."""
    import os
    import signal

    children: dict[int, list[int]] = {}
    try:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                children.setdefault(ppid, []).append(int(entry))
    except OSError:
        return
    todo, found = [os.getpid()], []
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


class UsageError(ValueError):
    """A command-line argument that cannot be used; the message says what to pass instead."""


class MissingDependency(RuntimeError):
    """An optional library a feature needs is not installed; the message names the pip command that adds it."""


class FetchError(RuntimeError):
    """A model could not be obtained or failed verification; the message says what to do."""


def exit_status(e: BaseException) -> tuple[int, str] | None:
    """The exit status and the one line to print for an error a user can cause or meet; None for anything else
    (a bug: its traceback is what a report needs). 2: fix the input and rerun; 1: the run failed and can be
    resumed; 130: stopped by a signal."""
    if isinstance(e, ConfigError):
        return 2, f"config error: {e}"
    # raised in the driver or inside an actor (Ray's wrapper is also an instance of the cause's class)
    for kind, prefix in ((DataError, "data error"), (ModelError, "model error"), (CheckpointError, "checkpoint error")):
        if isinstance(e, kind):
            return 2, f"{prefix}: {_cause(e)}"
    if isinstance(e, (UsageError, MissingDependency, FetchError)):
        return 2, f"error: {_cause(e)}"
    if isinstance(e, (ActorFailure, WeightSyncError, NonFiniteLossError)):
        return 1, report_failure(e)
    if isinstance(e, KeyboardInterrupt):
        # train() has already stopped its actors (its finally); checkpoints are only ever replaced whole
        how = "SIGTERM" if isinstance(e, Stopped) else "Ctrl-C (SIGINT)"
        return 130, f"sdft-ray: stopped by {how}; the last complete checkpoint is kept"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return 1, (
            f"error: no space left on device ({e.filename or 'writing the run log'}); the last complete checkpoint "
            "is intact: free space, then rerun with train.resume=auto"
        )
    oom = memory_kill(e)  # a Ray error: one line when it is a memory kill
    return (1, f"error: {oom}") if oom else None


def report_failure(e: BaseException) -> str:
    """The one line for a run that could not go on; a memory kill behind it is named as such."""
    oom = memory_kill(e.__cause__) if e.__cause__ is not None else None
    return f"error: {oom or _cause(e)}"


def _cause(e: BaseException) -> str:
    """The original message of an exception raised inside a Ray actor, without Ray's traceback wrapper."""
    cause = getattr(e, "cause", None)
    return str(cause if isinstance(cause, BaseException) else e)
