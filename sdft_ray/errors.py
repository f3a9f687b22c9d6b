"""The errors a user can cause or meet, each printed by the CLI as one line (no traceback).

They live here, free of heavy imports, so the CLI can name them without loading torch or Ray first.
"""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (libraries raise page-long ones), or its type if it has none."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class DataError(ValueError):
    """A dataset or record is unusable; the message names the file, the record and the field."""


class ModelError(ValueError):
    """A model folder that cannot be loaded; the message names the path or file and what to do."""


class ActorFailure(RuntimeError):
    """An actor died or a remote call timed out and the run cannot continue; the message says what to do."""


class WeightSyncError(RuntimeError):
    """A weight transfer timed out or arrived corrupted. The run must not go on with unknown weights."""


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss; the run stops before corrupting weights."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed (damaged, or would run code), or an output folder already in use."""


class Stopped(KeyboardInterrupt):
    """SIGTERM (what schedulers send before a kill), turned into the same clean stop as Ctrl-C."""


def stop_on_sigterm() -> None:
    """Make SIGTERM raise ``Stopped`` in the main thread. Call after ``ray.init``, which installs its own handler."""
    import signal
    import threading

    def handler(signum: int, frame: object) -> None:
        raise Stopped("SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
