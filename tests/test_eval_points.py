"""Evaluation during training (eval.sets / eval.every): scored with the trainer's weights of that step, every
answer kept, read back instead of rescored when a run resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_overrides

from sdft_ray import checkpoint as ckpt
from sdft_ray import eval_points
from sdft_ray.config import ConfigError, load_config
from sdft_ray.driver import SDFTDriver
from sdft_ray.errors import DataError
from sdft_ray.evaluate import evaluate


def _overrides(tiny: dict[str, str], out: Path, algo: str, **extra: object) -> list[str]:
    sets = [{"name": "shift", "data": tiny["eval"], "scorer": "exact", "max_examples": 6}]
    return tiny_overrides(
        tiny,
        out,
        train__algo=algo,
        train__steps=4,
        train__save_every=2,
        train__keep_checkpoints=3,
        train__lr_scheduler="constant",
        train__warmup_ratio=0,
        eval__every=2,
        eval__on_start=True,
        eval__max_new_tokens=8,
        eval__sets=json.dumps(sets),
        **extra,
    )


def _run(overrides: list[str]) -> dict:
    d = SDFTDriver(load_config(None, overrides))
    try:
        return d.run()
    finally:
        d.shutdown()


def _answers(out: Path, step: int) -> list[dict]:
    return [json.loads(x) for x in (eval_points.point_dir(out, step) / "shift.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algo", ["sdft", "sft"])
def test_eval_points_score_the_weights_of_their_step(tiny, ray_cluster, tmp_path: Path, algo: str) -> None:
    """The last point's answers are exactly what a fresh engine on the saved final student writes: the point
    used that step's weights (SFT's engines are synced only to score), and not the base model's."""
    over = _overrides(tiny, tmp_path, algo)
    _run(over)
    curve = eval_points.read_curve(tmp_path)
    assert sorted(curve) == [0, 2, 4]
    assert all(p["shift"]["examples"] == 6 for p in curve.values())
    final = ckpt.complete_checkpoints(tmp_path)[-1]
    assert final.name == "step-000004"
    cfg = eval_points.set_config(load_config(None, over), 0)
    fresh = evaluate(cfg, tiny["eval"], str(final / "student"), keep_answers=True)
    last = _answers(tmp_path, 4)
    assert [a["output"] for a in sorted(last, key=lambda a: a["index"])] == [
        s["output"] for s in sorted(fresh["answers"], key=lambda a: a["index"])
    ]
    assert [a["output"] for a in last] != [a["output"] for a in _answers(tmp_path, 0)]  # the weights moved
    assert curve[4]["shift"]["accuracy"] == pytest.approx(fresh["accuracy"])
    assert set(last[0]) == {"index", "output", "gold", "correct"}
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "eval"] == [0, 2, 4]


def test_a_resumed_run_reads_finished_points_back(tiny, ray_cluster, tmp_path: Path) -> None:
    over = _overrides(tiny, tmp_path, "sdft")
    _run(over)
    before = {s: (eval_points.point_dir(tmp_path, s) / "summary.json").stat().st_mtime_ns for s in (0, 2)}
    # the run is cut off after step 2's checkpoint: step 4's checkpoint and eval point never happened
    shutil.rmtree(ckpt.checkpoint_root(str(tmp_path)) / "step-000004")
    shutil.rmtree(eval_points.point_dir(tmp_path, 4))
    summary = _run([*over, "train.resume=auto"])
    assert summary["steps"] == 4
    assert sorted(eval_points.read_curve(tmp_path)) == [0, 2, 4]
    after = {s: (eval_points.point_dir(tmp_path, s) / "summary.json").stat().st_mtime_ns for s in (0, 2)}
    assert after == before  # scored once


def test_eval_sets_are_checked_up_front(tiny, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval.sets"):
        load_config(None, tiny_overrides(tiny, tmp_path, eval__every=2))
    twice = json.dumps([{"name": "a", "data": tiny["eval"]}, {"name": "a", "data": tiny["eval"]}])
    with pytest.raises(ConfigError, match="used twice"):
        load_config(None, tiny_overrides(tiny, tmp_path, eval__every=2, eval__sets=twice))


def test_a_missing_eval_file_stops_the_run_before_it_trains(tiny, tmp_path: Path) -> None:
    """A set whose file is gone is found when the driver is built (no Ray, nothing written), not at the first
    eval point an hour into a run; the line names the set and the file."""
    sets = [
        {"name": "shift", "data": tiny["eval"]},
        {"name": "probes", "data": str(tmp_path / "data" / "probes_eval.jsonl")},
    ]
    out = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(tiny, out, eval__every=2, eval__sets=json.dumps(sets)))
    with pytest.raises(DataError, match=r"eval.sets\[1\] \(probes\): .*probes_eval.jsonl: no such file"):
        SDFTDriver(cfg)
    assert not out.exists()
