"""Evaluation during training: every set in ``eval.sets`` scored at chosen steps, each answer kept on disk.

Scored through the run's own rollout engines (they hold the trainer's weights after each sync), so an eval point
costs generation only, no engine start. What a point wrote is read back instead of redone, so a resumed run
continues without scoring a step twice, and the curves are rebuilt from disk alone:

    <output_dir>/evals/step-000010/<set>.jsonl   one line per answer: index, output, gold, correct
    <output_dir>/evals/step-000010/summary.json  {set: {"accuracy", "examples", "seconds"}}, written last
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path
from typing import Any

from sdft_ray.config import Config
from sdft_ray.errors import DataError


def is_eval_step(cfg: Config, step: int, total_steps: int) -> bool:
    """Step 0 with eval.on_start; every eval.every steps and the last step with eval.every."""
    e = cfg.eval
    if not e.sets:
        return False
    if step == 0:
        return e.on_start
    return e.every > 0 and (step % e.every == 0 or step == total_steps)


def point_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "evals" / f"step-{step:06d}"


def read_point(output_dir: str | Path, step: int) -> dict[str, Any] | None:
    """A finished eval point's summary, or None (never scored, or cut off before its summary was written)."""
    path = point_dir(output_dir, step) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def read_curve(output_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Every finished eval point of a run: step -> {set: summary}."""
    root = Path(output_dir) / "evals"
    out = {}
    for folder in sorted(root.glob("step-*")) if root.is_dir() else []:
        point = read_point(output_dir, int(folder.name.removeprefix("step-")))
        if point is not None:
            out[int(folder.name.removeprefix("step-"))] = point
    return out


def drop_after(output_dir: str | Path, step: int) -> None:
    """Forget points past ``step``: a resumed run retrains those steps, so their scores were of lost weights."""
    import shutil

    for folder in (Path(output_dir) / "evals").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > step:
            shutil.rmtree(folder)


def set_config(cfg: Config, index: int) -> Config:
    """``cfg`` with eval.* set for ``eval.sets[index]`` (its own length, example count and scorer)."""
    es, c = cfg.eval.sets[index], copy.deepcopy(cfg)
    if es.max_examples >= 0:
        c.eval.max_examples = es.max_examples
    if es.max_new_tokens:
        c.eval.max_new_tokens = es.max_new_tokens
    if es.scorer:
        c.eval.scorer = es.scorer
    return c


def check_sets(cfg: Config) -> None:
    """Read every eval set as its eval point will: a missing or malformed file fails before training starts,
    not at the first eval point, where it cost a run the steps since its last checkpoint."""
    from sdft_ray.data import load_examples

    for i, es in enumerate(cfg.eval.sets):
        try:
            load_examples(cfg.data, es.data)
        except DataError as e:
            raise DataError(f"eval.sets[{i}] ({es.name}): {e}") from None


def score_point(cfg: Config, tokenizer: Any, engines: list[Any], output_dir: str | Path, step: int) -> dict[str, Any]:
    """Score every set at ``step`` on ``engines`` (already holding that step's weights), or read it back."""
    from sdft_ray.evaluate import evaluate_with_engines

    done = read_point(output_dir, step)
    if done is not None:
        return done
    folder = point_dir(output_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    for i, es in enumerate(cfg.eval.sets):
        c = set_config(cfg, i)
        t0 = time.perf_counter()
        res = evaluate_with_engines(c, tokenizer, engines, es.data, scorer=c.eval.scorer, keep_answers=True)
        _write_lines(folder / f"{es.name}.jsonl", res["answers"])
        summary[es.name] = {
            "accuracy": res["accuracy"],
            "examples": res["examples"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
    _write_atomic(folder / "summary.json", json.dumps(summary, indent=1))
    return summary


def _write_lines(path: Path, rows: list[dict[str, Any]]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
