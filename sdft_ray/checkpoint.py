"""Atomic checkpoints: written under a temp folder, marked complete, then renamed into place.

A checkpoint folder ``step-000012/`` holds ``student/`` (HF format, safetensors), ``teacher/`` (EMA),
``deepspeed/`` (optimizer + scheduler), ``driver_state.json`` (step, data position, versions) and a
``COMPLETE`` marker written last. A kill mid-write leaves only a ``.tmp-*`` folder, which resume ignores.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdft_ray.errors import CheckpointError, first_line

MARKER = "COMPLETE"
# Classes DeepSpeed pickles into its optimizer state (ZeRO 1-3): plain data holders. Resuming unpickles with
# torch's weights_only loader allowing only these, so a crafted checkpoint cannot run code (DeepSpeed's own
# loader uses weights_only=False).
SAFE_DEEPSPEED_GLOBALS = (
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
)


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def temp_dir(output_dir: str, step: int) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file and folder under ``root`` on disk, so the marker never outlives the data after a power loss."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def finalize(tmp: Path, step: int, driver_state: dict[str, Any], keep: int) -> Path:
    """Write the driver state, fsync everything, write the marker, rename into place, prune old checkpoints."""
    (tmp / "driver_state.json").write_text(json.dumps(driver_state, indent=1))
    _fsync_tree(tmp)
    with open(tmp / MARKER, "w") as f:
        f.write(str(step))
        f.flush()
        os.fsync(f.fileno())
    final = tmp.parent / f"step-{step:06d}"
    if final.exists():  # a previous attempt of this very step (e.g. after resume); replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    if keep > 0:
        for old in complete_checkpoints(tmp.parent.parent.as_posix())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(output_dir: str) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / MARKER).is_file() and (p / "driver_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError if ``path`` is damaged (unreadable files) or would run code when loaded."""
    import torch
    from safetensors import safe_open

    try:
        read_driver_state(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path.name} is damaged: driver_state.json unreadable ({e})") from None
    for f in sorted(path.glob("*/*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # safetensors has its own error types
            raise CheckpointError(f"checkpoint {path.name} is damaged: {f.relative_to(path)} ({e})") from None
    allowed = set(SAFE_DEEPSPEED_GLOBALS)
    for f in sorted((path / "deepspeed").rglob("*.pt")):
        rel = f.relative_to(path)
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as e:  # truncated zip, bad pickle stream
            raise CheckpointError(f"checkpoint {path.name} is damaged: {rel} ({first_line(e)})") from None
        if found - allowed:
            raise CheckpointError(
                f"checkpoint {path.name}: {rel} refers to {', '.join(sorted(found - allowed))}; loading it could "
                "run code, so sdft-ray refuses it (checkpoints it writes hold only tensors and plain data)"
            )
        try:
            with torch.serialization.safe_globals([_import(g) for g in sorted(found)]):
                torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CheckpointError(f"checkpoint {path.name} is damaged: {rel} ({first_line(e)})") from None


def disk_error(e: BaseException, output_dir: str) -> str | None:
    """What went wrong on disk behind ``e`` (also raised inside a Ray actor), or None if it was not the disk.

    torch.save reports a full disk as "RuntimeError: basic_ios::clear: iostream error", not as ENOSPC, so the
    free space left is checked too.
    """
    cause: BaseException | None = e
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno is not None:
            if cause.errno == errno.ENOSPC:
                return "no space left on device"
            return f"{cause.strerror} ({cause.filename})"
        cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
    try:
        free = shutil.disk_usage(output_dir).free
    except OSError:
        return None
    return f"no space left on device ({free / 2**20:.1f} MB free)" if free < 64 * 2**20 else None


def _import(dotted: str) -> Any:
    import importlib

    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """``auto`` -> newest intact checkpoint (or None for a fresh start); a path -> that checkpoint, verified.

    ``auto`` steps back past damaged checkpoints, saying so; a checkpoint that would run code is always an error.
    """
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        for path in reversed(found):
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as e:
                if "is damaged" not in str(e):
                    raise
                print(f"sdft-ray: {e}; trying the one before", file=sys.stderr, flush=True)
        if found:
            raise CheckpointError(f"every checkpoint in {checkpoint_root(output_dir)} is damaged; nothing to resume")
        return None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        earlier = [p for p in complete_checkpoints(str(path.parent.parent)) if p.name < path.name]
        hint = f"; resume from {earlier[-1]} with train.resume={earlier[-1]}" if earlier else ""
        raise CheckpointError(f"{e}{hint}") from None
    return path


def prepare_output(output_dir: str, resume: str, overwrite: bool, dry_run: bool = False) -> Path | None:
    """Before a run: clear leftovers of killed writers, refuse to mix two runs in one folder, pick the resume.

    Returns the checkpoint to resume from (None for a fresh start). ``dry_run``: the same checks, nothing
    created or deleted.
    """
    out = Path(output_dir)
    if not out.is_absolute() and os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        # set by Ray for a `ray job submit` entrypoint, whose working dir is Ray's package cache: shared by
        # every job with the same code, and deleted with it
        raise CheckpointError(
            f"train.output_dir {output_dir} is relative, and under `ray job submit` that means Ray's temporary "
            "package cache; give an absolute path on a filesystem every node sees (train.output_dir=/shared/...)"
        )
    if not dry_run:  # a folder we can write to, found out now rather than at the first checkpoint
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            what = {17: "is a file", 20: "is under a file"}.get(e.errno or 0, f"is not writable ({e.strerror})")
            raise CheckpointError(f"train.output_dir {out} {what}; choose a folder this job can write to") from None
    root = checkpoint_root(output_dir)
    if root.is_dir() and not dry_run:
        for tmp in root.glob(".tmp-*"):  # a writer killed mid-checkpoint; never marked complete
            shutil.rmtree(tmp, ignore_errors=True)
    previous = [p.name for p in (*complete_checkpoints(output_dir), out / "metrics.jsonl") if p.exists()]
    if previous and not resume:
        if not overwrite:
            raise CheckpointError(
                f"train.output_dir {out} already holds a run ({', '.join(previous[:3])}); continue it with "
                "train.resume=auto, start over with train.overwrite=true (deletes its checkpoints and metrics), "
                "or choose another train.output_dir"
            )
        if not dry_run:
            shutil.rmtree(root, ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
    return resolve_resume(resume, output_dir)


def read_driver_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "driver_state.json").read_text())


# How this invocation starts, not what the run is: never compared.
RESUME_IGNORED = ("train.resume", "train.overwrite", "train.allow_config_change")
# Settings that change how a run executes but not what it computes: a resume may change them freely.
# Everything else (model, data, algorithm, loss, teacher, batch, optimizer and schedule, sampling, seed) is the
# run's math; changing it mid-run silently makes a different run.
RESUME_SAFE = (
    "train.output_dir",
    "train.save_every",
    "train.keep_checkpoints",
    "train.max_bad_steps",
    "train.num_cpus",
    "train.num_gpus",
    "train.torch_threads",
    "train.micro_batch_size",  # gradient accumulation keeps train.batch_size
    "train.share_prompt_prefix",
    "model.gradient_checkpointing",
    "model.attn_implementation",
    "rollout.backend",
    "rollout.num_engines",
    "rollout.tensor_parallel_size",
    "rollout.gpu_memory_utilization",
    "rollout.kv_cache_memory_gb",
    "rollout.enable_sleep_mode",
    "rollout.enforce_eager",
    "rollout.num_cpus",
    "rollout.num_gpus",
    "rollout.torch_threads",
    "teacher.placement",
    "teacher.num_actors",
    "teacher.num_cpus",
    "teacher.num_gpus",
    "teacher.torch_threads",
    "loss.chunk_tokens",
    "logging.",
    "eval.",
    "continual.",
    "pipeline.sync_bucket_mb",
    "pipeline.sync_inflight_buckets",
    "pipeline.weight_transport",
    "pipeline.sync_timeout_s",
    "pipeline.call_timeout_s",
    "pipeline.verify_weight_checksums",
    "pipeline.verify_weights_every",
    "pipeline.max_actor_restarts",
    "pipeline.max_logprob_gap",
)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Keys whose value differs between a checkpoint's config and this run's: (safe, changing the math).

    Each entry reads ``key: old -> new``. Lists compare as JSON (tuples and lists are the same setting).
    """
    a, b = _flatten(saved), _flatten(current)
    safe, unsafe = [], []
    for key in sorted(a.keys() | b.keys()):
        old, new = a.get(key, "<absent>"), b.get(key, "<absent>")
        if key in RESUME_IGNORED or json.dumps(old, default=str) == json.dumps(new, default=str):
            continue
        entry = f"{key}: {old!r} -> {new!r}"
        (safe if key.startswith(RESUME_SAFE) else unsafe).append(entry)
    return safe, unsafe


def save(output_dir: str, step: int, state: dict[str, Any], keep: int, write: Callable[[Path], None]) -> Path:
    """Checkpoint ``step``: ``write(tmp)`` fills a temporary folder (the trainers' files), ``state`` (the driver's)
    marks it complete. A full disk or a quota ends in one line that says the last good checkpoint is intact."""
    tmp: Path | None = None
    try:
        tmp = temp_dir(output_dir, step)
        write(tmp)
        return finalize(tmp, step, state, keep)
    except Exception as e:
        err = disk_error(e, output_dir)
        if err is None:
            raise
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # never marked complete: the last good one stays newest
        last = complete_checkpoints(output_dir)
        kept = f"{last[-1].name} is intact" if last else "no earlier checkpoint exists"
        raise CheckpointError(
            f"{err} while writing checkpoint step {step} under {output_dir}; {kept}. "
            "Free space, then rerun with train.resume=auto"
        ) from None


def check_resume_config(path: Path, current: dict[str, Any], allow_change: bool) -> None:
    """Name every setting that differs from the checkpoint's; refuse those that change the run's math."""
    saved = read_driver_state(path).get("config")
    if saved is None:
        print(f"sdft-ray: {path} holds no config (an older checkpoint): resuming without comparing", file=sys.stderr)
        return
    safe, unsafe = config_changes(saved, current)
    if safe:
        print(f"sdft-ray: resuming with changed settings: {'; '.join(safe)}", file=sys.stderr, flush=True)
    if unsafe and not allow_change:
        raise CheckpointError(
            f"{path} was trained with other settings: {'; '.join(unsafe)}. Resuming would mix two runs; "
            "use the checkpoint's settings, or add train.allow_config_change=true to resume anyway"
        )
    if unsafe:
        print(f"sdft-ray: resuming with CHANGED run settings: {'; '.join(unsafe)}", file=sys.stderr, flush=True)
