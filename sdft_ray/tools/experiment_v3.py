"""Protocol v3 (docs/results.md): SDFT vs SFT on BFCL function calling, HumanEval and probes as what to keep.

One command per model; everything it finished is read back from disk, so it is safe to kill and rerun:

    python -m sdft_ray.tools.experiment_v3 --config configs/v3_qwen0.5b.yaml --out runs/v3_qwen0.5b --seeds 0 1 2

- ``data/train.jsonl``: the training set, the same for every run (written once: a seed-0 shuffle of
  ``bfcl_train.jsonl``, the records whose teacher prompt fits ``data.max_prompt_length``, the first ``--n-train``);
- ``base/``: the base model scored once on every eval set (greedy scoring of one model gives one answer);
  ``--base-only`` stops there (a new model's base column before its protocol's runs);
- ``{sdft,sft}_seed{N}/``: one training run each, with eval points during it (``eval.every``), resumed from its
  last checkpoint when cut off (started again when it has none: ``<run>.lost-<time>/`` keeps what that attempt
  logged); ``DONE.json`` when finished (then only the final student is kept, under ``checkpoints/``);
- ``results.md`` / ``results.json`` / ``curves.png``: rebuilt from all of the above after every run.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sdft_ray import checkpoint as ckpt
from sdft_ray import eval_points
from sdft_ray.config import Config, DataConfig, load_config

METHODS = ["sdft", "sft"]  # the order of the tables' rows


def prepare_data(cfg: Config, source: str, root: Path, n_train: int) -> Path:
    """The training file every run of this experiment reads (written once, then reused as it is)."""
    from sdft_ray.data import load_examples, tokenize_examples
    from sdft_ray.modeling import load_tokenizer

    out = root / "data" / "train.jsonl"
    if out.is_file():
        return out
    lines = Path(source).read_text().splitlines()
    tok = load_tokenizer(cfg.model)
    lengths = []
    # measured under the configured teacher template and the official one, the longer counting: the set does
    # not depend on which template the teacher-gap table picks
    for template in (cfg.data.teacher_template, DataConfig().teacher_template):
        data_cfg = copy.deepcopy(cfg.data)
        data_cfg.max_prompt_length, data_cfg.teacher_template = 10**6, template  # cut nothing
        examples = tokenize_examples(load_examples(data_cfg, source), tok, data_cfg)
        lengths.append([len(ex.teacher_prompt_ids) for ex in examples])
    fits = [i for i, n in enumerate(map(max, *lengths)) if n <= cfg.data.max_prompt_length]
    random.Random(0).shuffle(fits)
    keep = fits[:n_train]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines[i] + "\n" for i in keep))
    note = {"source": source, "records": len(lines), "fit": len(fits), "kept": len(keep)}
    (root / "data" / "train.json").write_text(json.dumps(note, indent=1))
    return out


def score_base(cfg: Config, root: Path) -> dict[str, Any]:
    """The base model on every eval set, once for all runs (an eval point at step 0 of its own folder)."""
    from sdft_ray.evaluate import rollout_engines
    from sdft_ray.modeling import load_tokenizer

    out = root / "base"
    done = eval_points.read_point(out, 0)
    if done is not None:
        return done
    with rollout_engines(cfg) as engines:
        return eval_points.score_point(cfg, load_tokenizer(cfg.model), engines, out, 0)


TEMPLATES = {
    "official": DataConfig().teacher_template,
    "plain": "{question}\n\nAn example of a correct response:\n{demonstration}\n",
}
GAP_PARTS = (  # (name, eval sets, new tokens, examples): the training distribution first, it decides
    (
        "bfcl",
        [
            "{root}/data/gap40.jsonl=bfcl",
            "data/evals/bfcl_simple_python_eval.jsonl=bfcl",
            "data/tasks/tool_use_eval.jsonl=tool_use",
            "data/tasks/probes_eval.jsonl=contains",
        ],
        256,
        40,
    ),
    ("humaneval", ["data/evals/humaneval.jsonl=humaneval"], 512, 20),
)


def teacher_gaps(config: str, overrides: list[str], root: Path, parts: tuple[str, ...]) -> str:
    """The teacher-gap table for each candidate template (before any training run), read back where done.

    ``gap40.jsonl`` is the first 40 records of the training set; every part is measured with 2 samples per
    example at the rollout temperature besides greedy. Writes ``gap_<template>_<part>.json`` and ``gap.md``."""
    from sdft_ray.evaluate import teacher_gap

    lines = [
        "| template | set | student greedy | teacher greedy | student T=1 | teacher T=1 | gold log-prob |",
        "|---|---|---|---|---|---|---|",
    ]
    train = (root / "data" / "train.jsonl").read_text().splitlines()
    (root / "data" / "gap40.jsonl").write_text("".join(x + "\n" for x in train[:40]))
    for part, sets, tokens, n in GAP_PARTS:
        for name, template in TEMPLATES.items():
            out = root / f"gap_{name}_{part}.json"
            if not out.is_file() and part in parts:
                over = [
                    *overrides,
                    f"eval.max_examples={n}",
                    f"eval.max_new_tokens={tokens}",
                    f"rollout.max_new_tokens={tokens}",
                ]
                cfg = load_config(config, over)
                cfg.data.teacher_template = template  # set here: a template is not a one-line override
                pairs = [tuple(x.format(root=root).split("=", 1)) for x in sets]
                t0 = time.perf_counter()
                res = teacher_gap(cfg, pairs, samples=2)
                res.update(_seconds=round(time.perf_counter() - t0), _template=template)
                out.write_text(json.dumps(res, indent=1))
            if out.is_file():
                for src, v in json.loads(out.read_text()).items():
                    if isinstance(v, dict) and "scorer" in v:
                        lines.append(
                            f"| {name} | {Path(src).stem} ({v['examples']}) | {v['student_accuracy']:.2f} | "
                            f"{v['teacher_accuracy']:.2f} | {v['student_sampled_accuracy']:.2f} | "
                            f"{v['teacher_sampled_accuracy']:.2f} | {v['student_gold_logprob']:.3f} -> "
                            f"{v['teacher_gold_logprob']:.3f} |"
                        )
    text = "\n".join(lines) + "\n"
    (root / "gap.md").write_text(text)
    return text


def _key(config: str, overrides: list[str], root: Path) -> str:
    """What a finished run was made of: the config file's bytes (and those it extends) and the overrides, with
    the experiment's folder written as ``<out>`` (a clone elsewhere reads the same runs back)."""
    h = hashlib.sha256()
    path: Path | None = Path(config)
    while path is not None:
        text = path.read_bytes()
        h.update(text)
        import yaml

        parent = (yaml.safe_load(text) or {}).get("extends")
        path = path.parent / parent if parent else None
    h.update(json.dumps([o.replace(str(root), "<out>") for o in overrides]).encode())
    return h.hexdigest()


def run_one(config: str, overrides: list[str], run_dir: Path, drift_ref: Any) -> dict[str, Any]:
    """One training run to its end: resumed from its last checkpoint if cut off, skipped if already done."""
    from sdft_ray.cluster import init_ray
    from sdft_ray.driver import train

    done_file, key = run_dir / "DONE.json", _key(config, overrides, run_dir.parent)
    if done_file.is_file():
        done = json.loads(done_file.read_text())
        if done.get("key") == key:
            print(f"sdft-ray: {run_dir.name} finished earlier, read back", file=sys.stderr, flush=True)
            return done
        raise SystemExit(
            f"{run_dir} holds a finished run of other settings (config or overrides changed); "
            "choose another --out or delete that folder"
        )
    if run_dir.is_dir() and not ckpt.complete_checkpoints(str(run_dir)):
        # cut off before its first checkpoint, or its checkpoints stayed on another machine (only records are
        # committed): start it again, keeping what the lost attempt logged beside it
        aside = run_dir.with_name(f"{run_dir.name}.lost-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(
            f"sdft-ray: {run_dir.name} has no checkpoint to resume from; starting again ({aside.name} kept)",
            file=sys.stderr,
            flush=True,
        )
    cfg = load_config(config, [*overrides, "train.resume=auto"])
    init_ray()
    t0 = time.perf_counter()
    summary = train(cfg)
    attempt_s = time.perf_counter() - t0
    final = ckpt.complete_checkpoints(cfg.train.output_dir)[-1]
    drift = drift_ref(str(final / "student"))
    _keep_only_final_student(run_dir)
    done = {
        "key": key,
        "overrides": overrides,
        "steps": summary["steps"],
        "last_attempt_s": attempt_s,
        "compute_s": _compute_seconds(run_dir),
        "peak_rss_gb": summary.get("peak_rss_gb"),
        "drift_nll": drift,
        "curve": eval_points.read_curve(run_dir),
    }
    done_file.write_text(json.dumps(done, indent=1, default=str))
    return done


def _compute_seconds(run_dir: Path) -> float:
    """Training and scoring time of the run over all its attempts: the last logged time of each step (a
    resumed run logs the steps it redid again) plus every eval point's scoring time."""
    per_step: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "step_s" in row:
            per_step[row["step"]] = row["step_s"]
    scoring = sum(s["seconds"] for p in eval_points.read_curve(run_dir).values() for s in p.values())
    return round(sum(per_step.values()) + scoring, 1)


def _keep_only_final_student(run_dir: Path) -> None:
    """Optimizer state and EMA teacher are ~9 GB per 0.5B checkpoint: a finished run keeps its final student."""
    points = ckpt.complete_checkpoints(run_dir)
    for p in points[:-1]:
        shutil.rmtree(p)
    for part in ("deepspeed", "teacher"):
        shutil.rmtree(points[-1] / part, ignore_errors=True)


def drift_reference(cfg: Config, root: Path) -> Any:
    """A function: model folder -> mean NLL per token of the base model's own greedy answers to general
    prompts (``tasks.DRIFT_PROMPTS``); the answers are made once and kept in ``base/drift_answers.json``."""
    from sdft_ray.tools.experiment import _drift
    from sdft_ray.tools.tasks import DRIFT_PROMPTS

    path = root / "base" / "drift_answers.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_drift(cfg.model.path, cfg.model.path, DRIFT_PROMPTS, None)))
    answers = json.loads(path.read_text())
    return lambda model: _drift(model, cfg.model.path, DRIFT_PROMPTS, answers)


def _mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f} ({', '.join(f'{x:.3f}' for x in xs)})"


def tables(root: Path) -> str:
    """results.md / results.json / curves.png from every finished run on disk (each one named), whichever
    methods and seeds this invocation trained: runs started one seed at a time still add up to one table."""
    base = eval_points.read_point(root / "base", 0) or {}
    sets = list(base)
    runs = {
        m: {s: json.loads((root / f"{m}_seed{s}" / "DONE.json").read_text()) for s in _finished_seeds(root, m)}
        for m in METHODS
    }
    lines = [
        "Finished runs: " + ", ".join(f"{m} seeds {sorted(r) or 'none'}" for m, r in runs.items()) + ".",
        "",
        "| model | " + " | ".join(sets) + " | drift NLL | compute s per run |",
        "|---|" + "---|" * (len(sets) + 2),
        "| base | "
        + " | ".join(f"{base[s]['accuracy']:.3f}" for s in sets)
        + " | "
        + (f"{_base_drift(root):.3f}" if _base_drift(root) is not None else "-")
        + " | |",
    ]
    for m, rs in runs.items():
        finals = [r["curve"][max(r["curve"], key=int)] for r in rs.values()]
        cells = [_mean_std([f[s]["accuracy"] for f in finals]) for s in sets]
        lines.append(
            f"| {m} (final) | "
            + " | ".join(cells)
            + f" | {_mean_std([r['drift_nll'] for r in rs.values()])} | "
            + (f"{statistics.mean(r['compute_s'] for r in rs.values()):.0f}" if rs else "-")
            + " |"
        )
    lines += ["", "Eval points during training (mean over finished seeds):", ""]
    lines += ["| method | step | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for m, rs in runs.items():
        steps = sorted({int(k) for r in rs.values() for k in r["curve"]})
        for st in steps:
            vals = [r["curve"][str(st)] for r in rs.values() if str(st) in r["curve"]]
            cells = [f"{statistics.mean(v[s]['accuracy'] for v in vals):.3f}" for s in sets]
            lines.append(f"| {m} | {st} | " + " | ".join(cells) + " |")
    lines += _first_steps(root, runs)
    text = "\n".join(lines) + "\n"
    (root / "results.md").write_text(text)
    (root / "results.json").write_text(json.dumps({"base": base, "runs": runs}, indent=1, default=str))
    _plot(root, base, runs, sets)
    return text


def _first_steps(root: Path, runs: dict[str, dict[int, Any]], n: int = 8) -> list[str]:
    """Where v1 and v2 showed a shock at step 3: each finished run's first steps, as logged."""
    lines = ["", f"First {n} steps of each run (loss, grad norm, share of completions cut at the limit, log-prob gap):"]
    lines += ["", "| run | " + " | ".join(str(i) for i in range(1, n + 1)) + " |", "|---|" + "---|" * n]
    for m, rs in runs.items():
        for seed in rs:
            rows: dict[int, dict[str, Any]] = {}
            for line in (root / f"{m}_seed{seed}" / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if "loss" in row and row["step"] <= n:
                    rows[row["step"]] = row  # a resumed run logs the steps it redid again: the last one counts
            cells = [
                f"{r['loss']:.3f} / {r['grad_norm']:.1f} / {r['clipped_ratio']:.2f} / {r['logprob_gap']:.3f}"
                if (r := rows.get(i))
                else "-"
                for i in range(1, n + 1)
            ]
            lines.append(f"| {m} seed {seed} | " + " | ".join(cells) + " |")
    return lines


def _finished_seeds(root: Path, method: str) -> list[int]:
    """Seeds whose run folder holds DONE.json; a kept ``<run>.lost-<time>`` folder beside it is not a run."""
    found = ((re.fullmatch(rf"{method}_seed(\d+)", p.name), p) for p in root.glob(f"{method}_seed*"))
    return sorted(int(m[1]) for m, p in found if m and (p / "DONE.json").is_file())


def _base_drift(root: Path) -> float | None:
    path = root / "base" / "drift_nll.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _plot(root: Path, base: dict[str, Any], runs: dict[str, dict[int, Any]], sets: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(3.2 * len(sets), 3), squeeze=False)
    colors = {"sdft": "tab:blue", "sft": "tab:orange"}
    styles = ["-", "--", ":", "-."]  # seeds of one method share a colour; the line tells them apart
    for ax, s in zip(axes[0], sets, strict=True):
        for m, rs in runs.items():
            for seed, r in rs.items():
                pts = sorted((int(k), v[s]["accuracy"]) for k, v in r["curve"].items())
                xs, ys = [0, *[p[0] for p in pts]], [base[s]["accuracy"], *[p[1] for p in pts]]
                ax.plot(
                    xs,
                    ys,
                    marker="o",
                    color=colors.get(m),
                    linestyle=styles[int(seed) % len(styles)],
                    alpha=0.8,
                    label=f"{m} seed {seed}",
                )
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(6, len(labels)))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(root / "curves.png", dpi=110)
    plt.close(fig)


_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``section.key=value`` overrides may stand anywhere, also right after ``--gap``'s or
    ``--seeds``' values, which would otherwise take them as one more value and stop with "invalid choice"."""
    ap = argparse.ArgumentParser(description="Protocol v3: SDFT vs SFT on BFCL, HumanEval and probes kept")
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--train-source", default="data/evals/bfcl_train.jsonl")
    ap.add_argument("--n-train", type=int, required=True, help="training records (one epoch)")
    ap.add_argument("--tables", action="store_true", help="only rebuild the tables from disk")
    ap.add_argument(
        "--gap", nargs="*", choices=[p[0] for p in GAP_PARTS], help="only the teacher-gap table (before any run)"
    )
    ap.add_argument("--base-only", action="store_true", help="only score the base model (base/), then stop")
    ap.add_argument("overrides", nargs="*", help="section.key=value, for every run (anywhere on the line)")
    argv = sys.argv[1:] if argv is None else argv
    overrides = [x for x in argv if _OVERRIDE.match(x)]
    a = ap.parse_args([x for x in argv if not _OVERRIDE.match(x)])
    a.overrides = overrides
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    root = Path(a.out)
    if a.tables:
        print(tables(root))
        return
    cfg = load_config(a.config, a.overrides)
    train_file = prepare_data(cfg, a.train_source, root, a.n_train)
    if a.gap is not None:
        print(teacher_gaps(a.config, a.overrides, root, tuple(a.gap or [p[0] for p in GAP_PARTS])))
        return
    from sdft_ray.cluster import init_ray

    init_ray()
    score_base(cfg, root)
    drift = drift_reference(cfg, root)
    if _base_drift(root) is None:
        (root / "base" / "drift_nll.json").write_text(json.dumps(drift(cfg.model.path)))
    if a.base_only:
        return
    for seed in a.seeds:
        for m in a.methods:
            run_dir = root / f"{m}_seed{seed}"
            over = [
                *a.overrides,
                f"data.train={train_file}",
                f"train.algo={m}",
                f"train.seed={seed}",
                f"train.output_dir={run_dir}",
            ]
            run_one(a.config, over, run_dir, drift)
            print(tables(root), flush=True)


if __name__ == "__main__":
    main()
