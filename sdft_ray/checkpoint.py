"""Atomic checkpoints: written under a temp folder, marked complete, then renamed into place.

A checkpoint folder ``step-000012/`` holds ``student/`` (HF format, safetensors), ``teacher/`` (EMA),
``deepspeed/`` (optimizer + scheduler), ``driver_state.json`` (step, data position, versions) and a
``COMPLETE`` marker written last. A kill mid-write leaves only a ``.tmp-*`` folder, which resume ignores.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"


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


def finalize(tmp: Path, step: int, driver_state: dict[str, Any], keep: int) -> Path:
    """Write the driver state and the marker, then rename into place and prune old checkpoints."""
    (tmp / "driver_state.json").write_text(json.dumps(driver_state, indent=1))
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


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """``auto`` -> newest complete checkpoint (or None for a fresh start); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    return path


def read_driver_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "driver_state.json").read_text())
