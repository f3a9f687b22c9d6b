"""Protocol v3's template rule (docs/results.md, written before any run), applied to a model's teacher-gap table:
the template whose teacher is more accurate sampled at T=1 on ``gap40`` (40 training records), the official
wording on a tie. Writes the model's protocol config with that template, the scores in its header:

    python -m sdft_ray.tools.v3_template docs/results/v3_qwen1.5b --out configs/v3_qwen1.5b_lora.yaml
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml


def choose(root: Path) -> tuple[str, str, dict[str, float]]:
    """(name, template text, teacher T=1 accuracy on gap40 per template) from ``gap_<template>_bfcl.json``."""
    scores, texts = {}, {}
    for name in ("official", "plain"):
        table = json.loads((root / f"gap_{name}_bfcl.json").read_text())
        gap40 = next(v for k, v in table.items() if k.endswith("gap40.jsonl"))
        scores[name], texts[name] = gap40["teacher_sampled_accuracy"], table["_template"]
    name = "plain" if scores["plain"] > scores["official"] else "official"
    return name, texts[name], scores


def write_config(root: Path, out: Path) -> str:
    """The 1.5B's v3 config: LoRA rank 16, alpha 32 on a bf16 base, lr 10x full fine-tuning's, the chosen
    template; everything else from ``v3_qwen0.5b.yaml``."""
    name, text, scores = choose(root)
    header = (
        "# Protocol v3 (docs/results.md), Qwen2.5-Coder-1.5B-Instruct with LoRA (rank 16, alpha 32, bf16 base; lr 10x\n"
        "# the full fine-tuning lr), everything else as configs/v3_qwen0.5b.yaml. Teacher template by the protocol's\n"
        f"# rule before any 1.5B run (python -m sdft_ray.tools.v3_template {root}): teacher T=1 on gap40,\n"
        f"# official {scores['official']:.2f} vs plain {scores['plain']:.2f} -> {name}.\n"
    )
    cfg = {
        "extends": "v3_qwen0.5b.yaml",
        "model": {"path": "models/qwen2.5-coder-1.5b-instruct", "dtype": "bfloat16", "lora": {"rank": 16, "alpha": 32}},
        "data": {"teacher_template": text},
        "train": {"lr": 2.0e-4, "output_dir": "runs/v3_qwen1.5b/run"},
    }
    out.write_text(header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return name


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="protocol v3: the teacher template chosen by the gap table's rule")
    ap.add_argument(
        "root", help="the model's experiment folder, holding gap_official_bfcl.json and gap_plain_bfcl.json"
    )
    ap.add_argument("--out", required=True, help="the config file to write")
    a = ap.parse_args(argv if argv is not None else sys.argv[1:])
    print(write_config(Path(a.root), Path(a.out)))


if __name__ == "__main__":
    main()
