"""The README's Python API block, run as written: only the model, the config file and the run's size are
swapped for the tiny ones (the lines it swaps are asserted to be there, so the README cannot drift from it)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def _readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_block_trains_and_saves(tiny, ray_cluster, tmp_path: Path) -> None:
    code = _readme_block()
    swaps = {
        '"configs/qwen0.5b.yaml"': "None",
        '["train.steps=20", "train.output_dir=runs/api-demo"]': repr(
            tiny_overrides(tiny, tmp_path / "run", train__steps=2)
        ),
        '"models/qwen2.5-coder-0.5b-instruct"': repr(tiny["model"]),
        '"runs/api-demo/final"': repr(str(tmp_path / "final")),
    }
    for old, new in swaps.items():
        assert old in code, f"README's API block no longer has {old}"
        code = code.replace(old, new)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    result = scope["result"]
    assert result.summary["steps"] == 2
    # the dataset it trained on is the run's own copy of the README's 64 records
    kept = (tmp_path / "run" / "train_dataset.jsonl").read_text().splitlines()
    assert len(kept) == 64 and '"teacher_prompt"' in kept[0]
    final = tmp_path / "final"
    assert (final / "config.json").is_file() and list(final.glob("*.safetensors"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(final)  # a normal HF model
