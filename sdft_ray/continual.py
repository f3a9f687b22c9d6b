"""Sequential continual learning: train stages in order, score every task after every stage.

Writes ``matrix.json``, ``matrix.md`` (accuracy: stage x task, forgetting per task) and ``matrix.png``.
Row 0 is the starting model; forgetting of task j = max over earlier rows of acc[j] - final acc[j].
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from sdft_ray import checkpoint as ckpt
from sdft_ray.config import Config, load_config


def _score_all(cfg: Config, model_path: str) -> dict[str, float]:
    """Accuracy of ``model_path`` on every stage's eval set, with one set of rollout engines."""
    from sdft_ray.evaluate import evaluate_with_engines, rollout_engines
    from sdft_ray.modeling import load_tokenizer

    tok_cfg = copy.deepcopy(cfg.model)
    tok_cfg.path = model_path
    tok = load_tokenizer(tok_cfg)
    with rollout_engines(cfg, model_path) as engines:
        return {st.name: evaluate_with_engines(cfg, tok, engines, st.eval)["accuracy"] for st in cfg.continual.stages}


def forgetting(matrix: list[list[float]]) -> list[float]:
    """Per task: best accuracy before the final row minus the final accuracy (>= 0 means forgotten)."""
    if len(matrix) < 2:
        return [0.0] * (len(matrix[0]) if matrix else 0)
    return [max(row[j] for row in matrix[:-1]) - matrix[-1][j] for j in range(len(matrix[0]))]


def write_reports(out: Path, rows: list[str], tasks: list[str], matrix: list[list[float]], algo: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fg = forgetting(matrix)
    (out / "matrix.json").write_text(
        json.dumps({"algo": algo, "rows": rows, "tasks": tasks, "accuracy": matrix, "forgetting": fg}, indent=1)
    )
    lines = [f"| after \\ task ({algo}) | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {r} | " + " | ".join(f"{a:.3f}" for a in row) + " |" for r, row in zip(rows, matrix, strict=True)]
    lines.append("| forgetting | " + " | ".join(f"{f:+.3f}" for f in fg) + " |")
    (out / "matrix.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for j, t in enumerate(tasks):
        ax.plot(range(len(rows)), [row[j] for row in matrix], marker="o", label=t)
    ax.set_xticks(range(len(rows)), rows, rotation=20)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"continual learning ({algo})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)
    trained = [i for i, _ in enumerate(tasks) if i + 1 < len(rows)]
    learned = ", ".join(f"{tasks[i]} {matrix[0][i]:.2f}->{matrix[-1][i]:.2f}" for i in range(len(tasks)))
    return (
        f"{algo}: {len(rows) - 1} stage(s) trained. Accuracy from start to end: {learned}. "
        f"Mean forgetting {sum(fg) / max(1, len(fg)):+.3f} (positive = lost since its best); "
        f"{len(trained)} task(s) had a training stage."
    )


def run_continual(config: str | None, overrides: list[str] | None = None) -> dict[str, Any]:
    from sdft_ray.driver import init_ray, train

    cfg = load_config(config, overrides)
    if not cfg.continual.stages:
        raise ValueError("continual.stages is empty: list the tasks to train in order (see configs/testbed.yaml)")
    init_ray()
    out = Path(cfg.continual.output_dir or Path(cfg.train.output_dir) / "continual")
    tasks = [st.name for st in cfg.continual.stages]
    t0 = time.perf_counter()
    model = cfg.model.path
    rows, matrix = ["start"], [[_score_all(cfg, model)[t] for t in tasks]]
    for st in cfg.continual.stages:
        if not st.train:
            continue
        c = copy.deepcopy(cfg)
        c.model.path = model
        c.data.train, c.data.eval = st.train, ""
        c.train.output_dir = str(out / st.name)
        c.train.steps = st.steps or cfg.train.steps
        train(c)
        model = str(ckpt.complete_checkpoints(c.train.output_dir)[-1] / "student")
        scores = _score_all(cfg, model)
        rows.append(st.name)
        matrix.append([scores[t] for t in tasks])
    summary = write_reports(out, rows, tasks, matrix, cfg.train.algo)
    (out / "summary.txt").write_text(summary + "\n")
    return {
        "output": str(out),
        "rows": rows,
        "tasks": tasks,
        "accuracy": matrix,
        "forgetting": forgetting(matrix),
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
