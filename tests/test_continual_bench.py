"""Shortened continual-learning run and benchmark smoke test, through the real CLI entry points."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import BACKENDS, requires_vllm, tiny_overrides

from sdft_ray.cli import main
from sdft_ray.tools.continual import forgetting


def test_forgetting_definition() -> None:
    m = [[0.5, 0.1], [0.7, 0.2], [0.4, 0.9]]
    assert forgetting(m) == [0.7 - 0.4, 0.2 - 0.9]


def test_continual_cli_writes_matrix_plot_and_summary(tiny, ray_cluster, tmp_path: Path, capsys) -> None:
    data = Path(tiny["train"]).parent
    cfg = {
        "continual": {
            "stages": [
                {"name": "shift", "train": tiny["train"], "eval": str(data / "shift_eval.jsonl"), "steps": 2},
                {
                    "name": "reverse",
                    "train": str(data / "reverse_eval.jsonl"),
                    "eval": str(data / "reverse_eval.jsonl"),
                    "steps": 2,
                },
                # evaluated only (an old skill), with a scorer of its own
                {"name": "upper", "eval": str(data / "upper_eval.jsonl"), "scorer": "contains"},
            ]
        },
        "eval": {"max_examples": 4, "max_new_tokens": 6},
    }
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg))
    over = [o for o in tiny_overrides(tiny, tmp_path / "run") if not o.startswith("data.train")]
    assert main(["continual", "--config", str(f), *over]) == 0
    out = tmp_path / "run" / "continual"
    shown = capsys.readouterr().out  # the console ends with the table and where the plot is
    assert "| start |" in shown and "| forgetting |" in shown and f"plot: {out}/matrix.png" in shown
    m = json.loads((out / "matrix.json").read_text())
    assert m["rows"] == ["start", "shift", "reverse"] and m["tasks"] == ["shift", "reverse", "upper"]
    assert len(m["accuracy"]) == 3 and all(len(r) == 3 for r in m["accuracy"])
    assert all(0.0 <= a <= 1.0 for r in m["accuracy"] for a in r)
    assert (out / "matrix.png").stat().st_size > 1000 and "forgetting" in (out / "matrix.md").read_text()
    assert "stage(s) trained" in (out / "summary.txt").read_text()
    # each stage started from the previous stage's weights
    assert (out / "reverse" / "checkpoints").is_dir()
    # the wall time is the scoring passes and the stages, each once (the start was once scored once per task)
    phases = m["phases_s"]
    assert list(phases) == ["score start", "train shift", "score shift", "train reverse", "score reverse"]
    assert m["wall_s"] - sum(phases.values()) < 0.5 * phases["score start"], (m["wall_s"], phases)


def test_compare_methods_runs_each_method_and_seed(tiny, ray_cluster, tmp_path: Path) -> None:
    from sdft_ray.tools.continual import compare_methods

    data = Path(tiny["train"]).parent
    stages = [
        {"name": "shift", "train": tiny["train"], "eval": str(data / "shift_eval.jsonl"), "steps": 1},
        {"name": "upper", "eval": str(data / "upper_eval.jsonl")},
    ]
    over = [o for o in tiny_overrides(tiny, tmp_path / "run") if not o.startswith("data.train")]
    over += [f"continual.stages={json.dumps(stages)}", "eval.max_examples=4", "eval.max_new_tokens=6"]
    rep = compare_methods(None, over, [3], ["shift"], tmp_path / "cmp")
    assert rep["new"] == ["shift"] and rep["old"] == ["upper"] and set(rep["table"]) == {"sdft", "sft"}
    assert all((tmp_path / "cmp" / f"{a}_seed3" / "continual" / "matrix.json").is_file() for a in ("sdft", "sft"))
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| base model |" in md and "| SDFT |" in md and "| SFT |" in md and "Seeds [3]" in md
    # an interrupted or extended comparison goes on without redoing finished runs...
    stamps = {
        a: (tmp_path / "cmp" / f"{a}_seed3" / "continual" / "matrix.json").stat().st_mtime_ns for a in rep["table"]
    }
    again = compare_methods(None, over, [3], ["shift"], tmp_path / "cmp")
    assert again["table"] == rep["table"]
    assert all(
        (tmp_path / "cmp" / f"{a}_seed3" / "continual" / "matrix.json").stat().st_mtime_ns == t
        for a, t in stamps.items()
    )
    # ...but a run made with other settings is never passed off as this one
    from sdft_ray.tools.continual import finished_run

    assert finished_run(tmp_path / "cmp" / "sdft_seed3", None, [*over, "train.lr=1e-3"]) is None


def test_bench_smoke_produces_every_field(tiny, ray_cluster, tmp_path: Path) -> None:
    over = tiny_overrides(tiny, tmp_path / "run")
    args = ["bench", *over, "--steps", "2", "--compare-sft", "--dtypes", "float32", "bfloat16"]
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    rep = json.loads((tmp_path / "b" / "bench.json").read_text())
    before, after, sft = rep["results"]  # each in a process of its own
    for r in (before, after, sft):
        for k in (
            "samples_per_s",
            "tokens_per_s",
            "s_per_demonstration",
            "mean_rollout_s",
            "mean_teacher_s",
            "mean_train_s",
            "mean_forward_s",
            "mean_loss_s",
            "mean_backward_s",
            "mean_optimizer_s",
            "mean_ema_s",
            "mean_weight_sync_s",
            "overlap",
            "lag_mean",
            "lag_max",
            "peak_memory_mb",
            "peak_rss_gb",
        ):
            assert k in r, k
        assert r["steps"] == 2 and r["samples_per_s"] > 0 and r["peak_memory_mb"]["trainer"]["rss_mb"] > 0
        assert 0 < r["mean_forward_s"] + r["mean_backward_s"] + r["mean_optimizer_s"] <= r["mean_train_s"]
        # overlap counts the stages a step is made of, not train_s's parts a second time
        stages = ("rollout_s", "teacher_s", "train_s", "ema_s", "weight_sync_s")
        assert r["overlap"] == pytest.approx(sum(r[f"mean_{k}"] for k in stages) * r["steps"] / r["wall_s"])
    assert before["dtype"] == "float32 (float32)" and after["dtype"] == "bfloat16 (bfloat16)"
    assert before["algo"] == after["algo"] == "sdft" and sft["algo"] == "sft" and after["mean_rollout_s"] > 0
    assert sft["dtype"] == after["dtype"]  # SFT runs as the last of --dtypes
    r = rep["ratios"]
    assert r["sdft_over_sft_wall_per_demonstration"] == after["s_per_demonstration"] / sft["s_per_demonstration"]
    assert r["speedup_whole_step"] == after["samples_per_s"] / before["samples_per_s"]
    assert r["speedup_backward_s"] == before["mean_backward_s"] / after["mean_backward_s"]
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "samples_per_s" in md and "--compare-sft" in md  # the table says how it was made, and where
    assert f"{os.cpu_count()} x " in md and "torch " in md and "mean_optimizer_s" in md
    with pytest.raises(SystemExit) as stop:  # argparse's one line and status 2, before anything runs
        main([*args[:-2], "fp8", "--out", str(tmp_path / "c")])
    assert stop.value.code == 2 and not (tmp_path / "c").exists()


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_cli_scores_a_model(tiny, ray_cluster, tmp_path: Path, capsys, backend) -> None:
    data = Path(tiny["train"]).parent
    base = tiny_overrides(tiny, tmp_path / "run", rollout__backend=backend, eval__max_examples=4)
    over = [*base, "eval.num_samples=3", "eval.greedy=false"]
    assert main(["eval", *over, "--data", str(data / "upper_eval.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["examples"] == 4 and 0.0 <= out["accuracy"] <= 1.0
    assert {"pass@1", "pass@3"} <= set(out) and out["pass@1"] <= out["pass@3"]
    # greedy: one deterministic sample per example, the same on a second call
    greedy = [*base, "eval.greedy=true", "eval.max_new_tokens=8"]
    assert main(["eval", *greedy, "--data", str(data / "upper_eval.jsonl")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(["eval", *greedy, "--data", str(data / "upper_eval.jsonl")]) == 0
    second = json.loads(capsys.readouterr().out)
    assert "pass@1" not in first and first["samples"] == second["samples"]


@requires_vllm
def test_bench_compares_rollout_backends(tiny, ray_cluster, tmp_path: Path) -> None:
    over = tiny_overrides(tiny, tmp_path / "run", train__steps=2)
    assert main(["bench", *over, "--steps", "2", "--compare-rollout", "--out", str(tmp_path / "b")]) == 0
    rep = json.loads((tmp_path / "b" / "bench.json").read_text())
    vllm, hf = rep["results"][1:]
    assert vllm["system"].startswith("rollout: vllm") and hf["system"] == "rollout: transformers generate"
    assert vllm["tokens_per_s"] > 0 and hf["tokens_per_s"] > 0
    assert rep["ratios"]["vllm_over_hf_rollout_tokens_per_s"] == vllm["tokens_per_s"] / hf["tokens_per_s"]
