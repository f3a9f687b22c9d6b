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
        return {
            st.name: evaluate_with_engines(cfg, tok, engines, st.eval, scorer=st.scorer)["accuracy"]
            for st in cfg.continual.stages
        }


def forgetting(matrix: list[list[float]]) -> list[float]:
    """Per task: best accuracy before the final row minus the final accuracy (>= 0 means forgotten)."""
    if len(matrix) < 2:
        return [0.0] * (len(matrix[0]) if matrix else 0)
    return [max(row[j] for row in matrix[:-1]) - matrix[-1][j] for j in range(len(matrix[0]))]


def write_reports(
    out: Path, rows: list[str], tasks: list[str], matrix: list[list[float]], algo: str, extra: dict | None = None
) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fg = forgetting(matrix)
    record = {"algo": algo, "rows": rows, "tasks": tasks, "accuracy": matrix, "forgetting": fg, **(extra or {})}
    (out / "matrix.json").write_text(json.dumps(record, indent=1))
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


def run_continual(
    config: str | None, overrides: list[str] | None = None, start: dict[str, float] | None = None
) -> dict[str, Any]:
    """``start``: the starting model's scores when already known (greedy scoring of the same model and eval
    sets gives the same numbers, so a multi-seed comparison scores the base model once)."""
    from sdft_ray.cluster import init_ray
    from sdft_ray.driver import train

    cfg = load_config(config, overrides)
    if not cfg.continual.stages:
        raise ValueError("continual.stages is empty: list the tasks to train in order (see configs/testbed.yaml)")
    init_ray()
    out = Path(cfg.continual.output_dir or Path(cfg.train.output_dir) / "continual")
    tasks = [st.name for st in cfg.continual.stages]
    t0 = time.perf_counter()
    phases: dict[str, float] = {}  # where the wall time went: scoring passes vs training stages

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args)
        phases[name] = round(time.perf_counter() - t, 1)
        return result

    model = cfg.model.path
    if start is None or set(start) != set(tasks):
        start = timed("score start", _score_all, cfg, model)  # once: every task from one set of engines
    rows, matrix = ["start"], [[start[t] for t in tasks]]
    for st in cfg.continual.stages:
        if not st.train:
            continue
        c = copy.deepcopy(cfg)
        c.model.path = model
        c.data.train, c.data.eval = st.train, ""
        c.train.output_dir = str(out / st.name)
        c.train.steps = st.steps or cfg.train.steps
        timed(f"train {st.name}", train, c)
        model = str(ckpt.complete_checkpoints(c.train.output_dir)[-1] / "student")
        scores = timed(f"score {st.name}", _score_all, cfg, model)
        rows.append(st.name)
        matrix.append([scores[t] for t in tasks])
    wall = time.perf_counter() - t0
    settings = [o for o in overrides or [] if not o.startswith("train.overwrite=")]  # how, not what, was run
    run = {"config": config, "config_sha256": _sha(config), "overrides": settings, "wall_s": wall, "phases_s": phases}
    summary = write_reports(out, rows, tasks, matrix, cfg.train.algo, run)
    (out / "summary.txt").write_text(summary + "\n")
    return {
        "output": str(out),
        "rows": rows,
        "tasks": tasks,
        "accuracy": matrix,
        "forgetting": forgetting(matrix),
        "summary": summary,
        "wall_s": wall,
        "phases_s": phases,
    }


def _sha(config: str | None) -> str:
    """The config file's content: a run made with an edited file of the same name is another run."""
    import hashlib

    return hashlib.sha256(Path(config).read_bytes()).hexdigest() if config else ""


def finished_run(out: Path, config: str | None, overrides: list[str]) -> dict[str, Any] | None:
    """The result of a continual run already completed in ``out`` with exactly this config, else None.

    Lets a multi-seed comparison that was interrupted (or extended with more seeds) go on without redoing
    runs; a run with other settings (overrides or config file content) is never reused. Runs should come from
    the same code version too: that is the caller's to keep (e.g. a git worktree at a fixed commit).
    """
    path = out / "continual" / "matrix.json"
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    same = rec.get("config") == config and rec.get("config_sha256") == _sha(config)
    if not same or rec.get("overrides") != list(overrides) or "wall_s" not in rec:
        return None
    note = path.parent / "summary.txt"
    summary = note.read_text().strip() if note.is_file() else ""
    return {"output": str(path.parent), "summary": summary, **rec}


def compare_methods(
    config: str | None,
    base: list[str],
    seeds: list[int],
    new_tasks: list[str],
    root: Path,
    algos: tuple[str, ...] = ("sdft", "sft"),
    note: str = "",
    transfer_tasks: tuple[str, ...] = (),
    after_run: Any = None,
) -> dict[str, Any]:
    """The same continual run for each method and seed (same base, stages, data, budget); writes results.md/json.

    Tasks in ``new_tasks`` are the skills being taught; ``transfer_tasks`` are eval-only tasks that test a taught
    skill on inputs no training prompt shows (reported per task only); every other stage is an old capability.
    ``after_run(folder)`` is called after each run (e.g. to drop what the comparison no longer needs).
    """
    import statistics

    t0 = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {a: [] for a in algos}
    for seed in seeds:
        for algo in algos:
            over = [
                *base,
                f"train.algo={algo}",
                f"train.seed={seed}",
                f"train.output_dir={root / f'{algo}_seed{seed}'}",
            ]
            done = finished_run(root / f"{algo}_seed{seed}", config, over)
            if done is not None:
                print(f"sdft-ray: reusing the finished {algo} seed {seed} run in {done['output']}", flush=True)
            # an unfinished run's folders (an interrupted earlier attempt) are started over
            start = next(
                (dict(zip(r["tasks"], r["accuracy"][0], strict=True)) for rs in results.values() for r in rs), None
            )
            results[algo].append(done or run_continual(config, [*over, "train.overwrite=true"], start))
            if after_run is not None:
                after_run(root / f"{algo}_seed{seed}")
    tasks = results[algos[0]][0]["tasks"]
    new = [t for t in tasks if t in new_tasks]
    old = [t for t in tasks if t not in new_tasks and t not in transfer_tasks]

    def agg(algo: str, names: list[str], row: int = -1) -> tuple[float, float]:
        vals = [statistics.mean(r["accuracy"][row][tasks.index(t)] for t in names) for r in results[algo]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    head = f"| method | new tasks ({', '.join(new)}) | old tasks ({', '.join(old)}) | " + " | ".join(tasks)
    lines = [head + " | wall s |", "|---|---|---|" + "---|" * (len(tasks) + 1)]
    start = results[algos[0]][0]["accuracy"][0]
    lines.append(
        f"| base model | {agg(algos[0], new, 0)[0]:.3f} | {agg(algos[0], old, 0)[0]:.3f} | "
        + " | ".join(f"{v:.3f}" for v in start)
        + " | |"
    )
    table = {}
    for algo in algos:
        n, o = agg(algo, new), agg(algo, old)
        per = [statistics.mean(r["accuracy"][-1][j] for r in results[algo]) for j in range(len(tasks))]
        wall = statistics.mean(r["wall_s"] for r in results[algo])
        table[algo] = {"new_mean": n[0], "new_std": n[1], "old_mean": o[0], "old_std": o[1], "per_task": per}
        table[algo]["wall_s"] = wall
        lines.append(
            f"| {algo.upper()} | {n[0]:.3f} ± {n[1]:.3f} | {o[0]:.3f} ± {o[1]:.3f} | "
            + " | ".join(f"{p:.3f}" for p in per)
            + f" | {wall:.0f} |"
        )
    total = time.perf_counter() - t0
    lines += [
        "",
        f"Seeds {seeds}; mean ± std over seeds of the accuracy after the last stage; wall s = mean per run "
        f"(training + every scoring pass); {note + '; ' if note else ''}total {total:.0f} s on this machine.",
    ]
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text("\n".join(lines) + "\n")
    report = {"seeds": seeds, "tasks": tasks, "new": new, "old": old, "table": table, "wall_s": total}
    report["runs"] = results
    (root / "results.json").write_text(json.dumps(report, indent=1))
    return report
