"""The protocol-v3 runner: runs finished earlier are read back, never retrained; tables come from disk alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides

from sdft_ray.tools import experiment_v3


def _config(tiny: dict[str, str], tmp_path: Path) -> Path:
    sets = [
        {"name": "shift", "data": tiny["eval"], "scorer": "exact", "max_examples": 4},
        {"name": "shift_long", "data": tiny["eval"], "scorer": "exact", "max_examples": 6, "max_new_tokens": 12},
    ]
    raw: dict = {}
    for o in tiny_overrides(tiny, tmp_path / "unused", train__steps=0, eval__max_new_tokens=8):
        key, value = o.split("=", 1)
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value) if value else ""
    raw["train"].update(epochs=1, batch_size=4, micro_batch_size=2, save_every=2, keep_checkpoints=1)
    raw["eval"].update(every=2, sets=sets)
    path = tmp_path / "v3_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_runner_reads_finished_runs_back_and_rebuilds_tables(tiny, ray_cluster, tmp_path: Path) -> None:
    config, out = _config(tiny, tmp_path), tmp_path / "v3"
    args = ["--config", str(config), "--out", str(out), "--n-train", "8", "--seeds", "0", "--train-source"]
    experiment_v3.main([*args, tiny["train"]])
    train = (out / "data" / "train.jsonl").read_text().splitlines()
    assert len(train) == 8 and set(train) <= set(Path(tiny["train"]).read_text().splitlines())
    for m in ("sdft", "sft"):
        done = json.loads((out / f"{m}_seed0" / "DONE.json").read_text())
        assert done["steps"] == 2 and sorted(done["curve"]) == ["2"]  # one epoch of 8 records, 4 per step
        assert set(done["curve"]["2"]) == {"shift", "shift_long"}
        assert done["curve"]["2"]["shift_long"]["examples"] == 6
        assert done["drift_nll"] > 0
        kept = list((out / f"{m}_seed0" / "checkpoints").iterdir())
        assert [p.name for p in kept] == ["step-000002"]
        assert sorted(p.name for p in kept[0].iterdir() if p.is_dir()) == ["student"]  # the 9 GB parts dropped
    base = json.loads((out / "base" / "evals" / "step-000000" / "summary.json").read_text())
    assert base["shift"]["examples"] == 4
    results = (out / "results.md").read_text()
    assert "| sdft (final) |" in results and "| sft (final) |" in results and (out / "curves.png").is_file()

    metrics = (out / "sft_seed0" / "metrics.jsonl").stat().st_mtime_ns
    experiment_v3.main([*args, tiny["train"]])  # everything finished: read back, nothing retrained
    assert (out / "sft_seed0" / "metrics.jsonl").stat().st_mtime_ns == metrics
    experiment_v3.main([*args, tiny["train"], "--methods", "sft"])  # one method asked for: the table keeps both
    assert "sdft seeds [0], sft seeds [0]" in (out / "results.md").read_text()

    import shutil

    moved = tmp_path / "elsewhere" / "v3"  # a clone in another folder: its finished runs are read back too
    shutil.copytree(out, moved)
    experiment_v3.main(["--config", str(config), "--out", str(moved), *args[4:], tiny["train"]])
    assert (moved / "sft_seed0" / "metrics.jsonl").stat().st_mtime_ns == (
        out / "sft_seed0" / "metrics.jsonl"
    ).stat().st_mtime_ns

    with pytest.raises(SystemExit, match="other settings"):  # a finished run is never mixed with new settings
        experiment_v3.main([*args, tiny["train"], "train.lr=0.5"])

    # what a fresh clone holds of a run cut off on another machine: its records, no checkpoint (not committed)

    shutil.rmtree(out / "sft_seed0" / "checkpoints")
    (out / "sft_seed0" / "DONE.json").unlink()
    experiment_v3.main([*args, tiny["train"]])
    assert json.loads((out / "sft_seed0" / "DONE.json").read_text())["steps"] == 2  # trained again, from step 0
    lost = [p for p in out.iterdir() if p.name.startswith("sft_seed0.lost-")]
    assert len(lost) == 1 and (lost[0] / "metrics.jsonl").is_file()  # the lost attempt's log kept beside it


@pytest.mark.parametrize(
    ("official", "plain", "chosen"), [(0.31, 0.64, "plain"), (0.5, 0.5, "official"), (0.7, 0.2, "official")]
)
def test_the_template_rule_picks_the_more_accurate_sampled_teacher_official_on_a_tie(
    tmp_path: Path, official: float, plain: float, chosen: str
) -> None:
    """tools/v3_template applies the protocol's rule to the gap table and writes a config that loads."""
    from sdft_ray.config import load_config
    from sdft_ray.tools import v3_template

    root = tmp_path / "v3_model"
    root.mkdir()
    for name, acc in (("official", official), ("plain", plain)):
        table = {
            f"{root}/data/gap40.jsonl": {"teacher_sampled_accuracy": acc, "scorer": "bfcl"},
            "data/evals/bfcl_simple_python_eval.jsonl": {"teacher_sampled_accuracy": 1.0 - acc, "scorer": "bfcl"},
            "_template": experiment_v3.TEMPLATES[name],
        }
        (root / f"gap_{name}_bfcl.json").write_text(json.dumps(table))
    out = Path("configs") / f"_test_v3_template_{chosen}_{official}.yaml"  # beside v3_qwen0.5b.yaml, which it extends
    try:
        assert v3_template.write_config(root, out) == chosen
        cfg = load_config(str(out))
    finally:
        out.unlink(missing_ok=True)
    assert cfg.data.teacher_template == experiment_v3.TEMPLATES[chosen]
    assert cfg.model.lora.rank == 16 and cfg.model.lora.alpha == 32 and cfg.train.lr == 2.0e-4
    assert cfg.eval.sets and cfg.data.max_prompt_length == 768  # the rest is the 0.5B's protocol


@pytest.mark.parametrize(
    "tail",
    [
        ["--gap", "bfcl", "humaneval", "model.path=m", "train.lr=0.1"],
        ["model.path=m", "--gap", "bfcl", "humaneval", "train.lr=0.1"],
        ["model.path=m", "train.lr=0.1", "--gap", "bfcl", "humaneval"],
    ],
)
def test_overrides_are_read_wherever_they_stand_even_after_a_list_option(tail: list[str]) -> None:
    a = experiment_v3.parse_args(["--config", "c.yaml", "--out", "docs/x=1", "--n-train", "8", *tail])
    assert a.gap == ["bfcl", "humaneval"] and a.overrides == ["model.path=m", "train.lr=0.1"]
    assert a.out == "docs/x=1"  # a path with '=' is not an override
    a = experiment_v3.parse_args(["--config", "c.yaml", "--out", "o", "--n-train", "8", "--seeds", "1", "2", "x.y=3"])
    assert a.seeds == [1, 2] and a.overrides == ["x.y=3"]
    with pytest.raises(SystemExit):  # a misspelt part is still refused
        experiment_v3.parse_args(["--config", "c.yaml", "--out", "o", "--n-train", "8", "--gap", "bfc"])
