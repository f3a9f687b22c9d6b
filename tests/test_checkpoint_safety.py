"""Checkpoints carry data, never code; damage is detected and stepped past; a finished run is never overwritten."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from sdft_ray import checkpoint as ckpt
from sdft_ray.errors import CheckpointError


class _Payload:
    """Unpickling this runs code: what a crafted checkpoint would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def _fake_checkpoint(out: Path, step: int) -> Path:
    """The layout finalize() writes, with small real files."""
    from safetensors.torch import save_file

    tmp = ckpt.temp_dir(str(out), step)
    (tmp / "student").mkdir()
    save_file({"w": torch.ones(4)}, str(tmp / "student" / "model.safetensors"))
    (tmp / "deepspeed" / "state").mkdir(parents=True)
    torch.save(
        {"module": {"w": torch.ones(4)}, "step": step}, tmp / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    )
    return ckpt.finalize(tmp, step, {"step": step}, keep=0)


def test_crafted_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    good = _fake_checkpoint(out, 2)
    bad = _fake_checkpoint(out, 4)
    marker = tmp_path / "pwned"
    target = bad / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(4)}, "x": _Payload(str(marker))}, target, pickle_module=pickle)
    for resume in ("auto", str(bad)):
        with pytest.raises(CheckpointError, match=r"refers to posix.system; loading it could run code"):
            ckpt.resolve_resume(resume, str(out))
    assert not marker.exists()
    assert ckpt.resolve_resume(str(good), str(out)) == good
    # DeepSpeed's own loader (weights_only=False) would have run it: the test payload is real
    torch.load(target, weights_only=False)
    assert marker.exists()


def test_auto_resume_steps_back_past_a_damaged_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    older = _fake_checkpoint(out, 2)
    newest = _fake_checkpoint(out, 4)
    opt = newest / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    opt.write_bytes(opt.read_bytes()[:200])  # COMPLETE marker present, optimizer file truncated
    assert ckpt.resolve_resume("auto", str(out)) == older
    assert "checkpoint step-000004 is damaged: deepspeed/state/mp_rank_00_model_states.pt" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match=rf"step-000004 is damaged.*resume from {older} with train.resume="):
        ckpt.resolve_resume(str(newest), str(out))
    w = older / "student" / "model.safetensors"
    w.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="every checkpoint .* is damaged"):
        ckpt.resolve_resume("auto", str(out))


def test_an_existing_run_is_not_overwritten_without_asking(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _fake_checkpoint(out, 2)
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    stale = ckpt.checkpoint_root(str(out)) / ".tmp-step-000004-999999"
    stale.mkdir()
    with pytest.raises(CheckpointError, match=r"already holds a run \(step-000002, metrics.jsonl\).*train.resume=auto"):
        ckpt.prepare_output(str(out), "", overwrite=False)
    assert first.is_dir() and (out / "metrics.jsonl").is_file()
    assert not stale.exists()  # a killed writer's leftovers are cleared in any case
    assert ckpt.prepare_output(str(out), "auto", overwrite=False) == first
    assert ckpt.prepare_output(str(out), "", overwrite=True) is None
    assert not first.exists() and not (out / "metrics.jsonl").exists()
    assert ckpt.prepare_output(str(tmp_path / "fresh"), "", overwrite=False) is None


def test_output_dir_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(CheckpointError, match=r"afile is a file; choose a folder"):
        ckpt.prepare_output(str(f), "", overwrite=False)
    with pytest.raises(CheckpointError, match=r"afile/run is under a file"):
        ckpt.prepare_output(str(f / "run"), "", overwrite=False)


def test_relative_output_dir_under_ray_job_submit_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert ckpt.prepare_output("runs/here", "", overwrite=False) is None  # a plain local run: fine
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray sets for a submitted entrypoint
    with pytest.raises(CheckpointError, match="runs/x is relative, and under `ray job submit`"):
        ckpt.prepare_output("runs/x", "", overwrite=False)
    assert ckpt.prepare_output(str(tmp_path / "abs"), "", overwrite=False) is None


def test_every_file_is_on_disk_before_the_marker(tmp_path: Path, monkeypatch) -> None:
    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    final = _fake_checkpoint(tmp_path / "run", 6)
    marker_at = next(i for i, p in enumerate(synced) if p.endswith("/" + ckpt.MARKER))
    before = {Path(p).name for p in synced[:marker_at]}
    assert {"model.safetensors", "mp_rank_00_model_states.pt", "driver_state.json"} <= before
    assert final.name == "step-000006"


def test_resume_refuses_settings_that_change_the_math(tiny, tmp_path: Path, capsys) -> None:
    """A resume into a run with another lr/steps/batch would silently mix two runs; safe settings just print."""
    from conftest import tiny_overrides

    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver

    out = tmp_path / "run"
    first = load_config(None, tiny_overrides(tiny, out, train__steps=4))
    tmp = ckpt.temp_dir(str(out), 4)
    ckpt.finalize(tmp, 4, {"step": 4, "version": 4, "config": first.to_dict()}, keep=2)

    changed = tiny_overrides(tiny, out, train__steps=8, train__lr=1e-4, train__resume="auto")
    with pytest.raises(CheckpointError) as err:
        SDFTDriver(load_config(None, changed))
    msg = str(err.value)
    assert "train.lr: 0.001 -> 0.0001" in msg and "train.steps: 4 -> 8" in msg
    assert "train.allow_config_change=true" in msg

    # what only changes how the run executes is allowed, and named
    SDFTDriver(load_config(None, tiny_overrides(tiny, out, train__steps=4, train__resume="auto", logging__log_every=2)))
    assert "logging.log_every: 1 -> 2" in capsys.readouterr().err
    # the user may insist; the changes are still printed
    SDFTDriver(load_config(None, [*changed, "train.allow_config_change=true"]))
    assert "CHANGED run settings" in capsys.readouterr().err and "train.lr" not in ckpt.RESUME_SAFE


def test_config_changes_splits_safe_from_math() -> None:
    saved = {"train": {"lr": 1e-3, "save_every": 2, "adam_betas": [0.9, 0.999]}, "loss": {"divergence": "jsd"}}
    now = {"train": {"lr": 1e-3, "save_every": 4, "adam_betas": (0.9, 0.999)}, "loss": {"divergence": "forward_kl"}}
    safe, unsafe = ckpt.config_changes(saved, now)
    assert safe == ["train.save_every: 2 -> 4"]  # a tuple equals the list JSON stored
    assert unsafe == ["loss.divergence: 'jsd' -> 'forward_kl'"]
