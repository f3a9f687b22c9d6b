"""The computed memory budget: exact parameter counts from the architecture, the review's hand-derived totals for
Qwen2.5-7B on one H200
(docs/clusters.md, "Memory, computed"), and the shipped configs' comments kept equal to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import AutoConfig, Qwen2Config

from sdft_ray.config import load_config
from sdft_ray.tools.memory_budget import ModelShape, budget, summary

QWEN25_7B = Qwen2Config(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_hidden_layers=28,
    num_key_value_heads=4,
    vocab_size=152064,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def qwen() -> ModelShape:
    return ModelShape.from_hf_config(QWEN25_7B)


def test_shape_is_counted_from_the_architecture(qwen: ModelShape) -> None:
    # embeddings and head 2 x 152064 x 3584; per layer q,o 3584^2, k,v 3584 x 512 (+ biases), MLP 3 x 3584 x 18944
    per_layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + (3584 + 2 * 512) + 3 * 3584 * 18944 + 2 * 3584
    assert qwen.params == 2 * 152064 * 3584 + 28 * per_layer + 3584
    assert qwen.largest_param == 152064 * 3584
    assert qwen.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 KV heads of 128, bf16


def test_single_h200_matches_the_review_and_fits(qwen: ModelShape) -> None:
    s = summary(budget(load_config("configs/single_h200.yaml"), qwen, gpu_gb=141))
    # review §11 by hand: fp32 master + Adam 91.5 + fp32 grads 30.5 + 16-bit buffer 15.2 + accumulator 15.2
    assert s["host_steady_gb"] == pytest.approx(152.3, abs=0.5)
    assert s["gpu_shared_peak_gb"] < 141  # trainer + engine on the one GPU
    no_accum = load_config("configs/single_h200.yaml", ["train.micro_batch_size=32"])
    assert summary(budget(no_accum, qwen))["host_steady_gb"] == pytest.approx(s["host_steady_gb"] - 15.2, abs=0.1)


def test_zero3_shards_weights_and_optimizer_across_ranks(qwen: ModelShape) -> None:
    cfg = load_config("configs/multi_node.yaml")
    lines = {x.what: x.bytes for x in budget(cfg, qwen)}
    n = cfg.train.num_trainers
    assert lines["student weights (ZeRO-3 shard)"] == pytest.approx(2 * qwen.params / n)
    key = next(k for k in lines if k.startswith("fp32 master + Adam"))
    assert lines[key] == pytest.approx(12 * qwen.params / n)


def test_config_comment_is_the_computed_budget(qwen: ModelShape) -> None:
    text = Path("configs/single_h200.yaml").read_text()
    s = summary(budget(load_config("configs/single_h200.yaml"), qwen, gpu_gb=141))
    gpu = re.search(r"= (\d+) of 141 GB", text)
    host = re.search(r"HOST\s+(\d+) GB steady", text)
    start = re.search(r"(\d+) GB at start-up", text)
    assert gpu and host and start, "the budget lines in configs/single_h200.yaml changed shape"
    assert int(gpu.group(1)) == round(s["gpu_shared_peak_gb"])
    assert int(host.group(1)) == round(s["host_steady_gb"])
    assert int(start.group(1)) == round(s["host_start_gb"])


def test_memory_command_reads_the_models_own_config(tiny, capsys) -> None:
    from sdft_ray.cli import main

    assert main(["memory", "--config", "configs/tiny_cpu.yaml", f"model.path={tiny['model']}"]) == 0
    out = capsys.readouterr().out
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny["model"]))
    assert f"model: {shape.params / 1e9:.2f} B parameters" in out and "| trainer | student weights (full) |" in out


def test_memory_command_without_a_readable_config_is_one_line(tmp_path: Path, capsys) -> None:
    from sdft_ray.cli import main

    missing = tmp_path / "no-model"
    assert main(["memory", "--config", "configs/tiny_cpu.yaml", "--model-config", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot read the model's config from {missing}") and "\n" not in err


def test_cpu_fp32_run_has_no_separate_master_and_no_gpu_lines(qwen: ModelShape) -> None:
    cfg = load_config("configs/tiny_cpu.yaml")  # fp32 on CPU, ZeRO 0, EMA teacher
    lines = budget(cfg, qwen)
    assert all(x.where == "host" and x.when == "steady" for x in lines)
    by = {x.what: x.bytes for x in lines}
    assert by["Adam m, v"] == 8 * qwen.params and by["EMA teacher weights"] == 4 * qwen.params
    assert "EMA teacher fp32 master" not in by  # fp32 weights are their own master


def test_cpu_budget_counts_every_role(qwen: ModelShape) -> None:
    from sdft_ray.tools.memory_budget import roles

    cfg = load_config("configs/qwen0.5b.yaml", ["rollout.backend=vllm"])
    lines = budget(cfg, qwen)
    per = roles(lines)
    assert set(per) == {"trainer", "rollout engine", "object store", "driver"}
    by = {(x.role, x.what): x.bytes for x in lines}
    p = qwen.params
    assert by[("rollout engine", "weights (1 engine(s))")] == 4 * p  # fp32, like the trainer
    assert by[("rollout engine", "KV cache (rollout.kv_cache_memory_gb 0.5)")] == 0.5 * 2**30
    # the object store holds at most sync_inflight_buckets + 1 buckets (each >= the largest tensor) ...
    bucket = max(256 * 2**20, 4 * qwen.largest_param)
    assert per["object store"] * 1e9 == pytest.approx(3 * bucket)
    # ... or, unbounded, the whole model
    unbounded = roles(budget(load_config("configs/qwen0.5b.yaml", ["pipeline.sync_inflight_buckets=0"]), qwen))
    assert unbounded["object store"] * 1e9 == pytest.approx(4 * p)
    # SFT without an eval set runs no engine and keeps no teacher
    sft = roles(budget(load_config("configs/qwen0.5b.yaml", ["train.algo=sft"]), qwen))
    assert "rollout engine" not in sft and sft["trainer"] < per["trainer"] - 4 * p / 1e9 + 1e-6


def test_memory_measured_prints_each_roles_peak_beside_the_budget(tiny, ray_cluster, tmp_path: Path, capsys) -> None:
    """A real run records every role's peak RSS; `sdft-ray memory --measured` prints it beside the budget."""
    from conftest import tiny_overrides

    from sdft_ray.cli import main
    from sdft_ray.driver import train

    over = tiny_overrides(tiny, tmp_path / "run", train__steps=1)
    summary = train(load_config(None, over))
    peaks = summary["peak_rss_gb"]
    assert set(peaks) == {"trainer0", "rollout0", "driver"} and all(0.05 < v < 20 for v in peaks.values())
    assert main(["memory", *over, "--measured", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    row = [x for x in out.splitlines() if x.startswith("| trainer | ")][-1]  # the per-role summary
    assert row.split("|")[3].strip() == f"{peaks['trainer0']:.1f}"
    assert main(["memory", *over, "--measured", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl there" in capsys.readouterr().err


QWEN25_14B = Qwen2Config(
    hidden_size=5120,
    intermediate_size=13824,
    num_attention_heads=40,
    num_hidden_layers=48,
    num_key_value_heads=8,
    vocab_size=152064,
    tie_word_embeddings=False,
)


def test_lora_counts_the_adapter_and_one_base(qwen: ModelShape) -> None:
    """LoRA on every linear layer: r x (in + out) per adapted matrix; no optimizer state, gradients or teacher
    copy for the base."""
    cfg = load_config("configs/single_h200_lora.yaml")
    lora = ModelShape.from_hf_config(QWEN25_14B, cfg.model.lora)
    r, h, kv, i = 64, 5120, 1024, 13824
    per_layer = r * ((h + h) * 2 + (h + kv) * 2 + (h + i) * 3)  # q, o; k, v; gate, up, down
    assert lora.adapter_params == 48 * per_layer
    lines = {x.what: x.bytes for x in budget(cfg, lora)}
    assert lines["student: frozen base weights"] == 2 * lora.params  # bf16, once
    assert not any("fp32 master" in k or "teacher weights" in k for k in lines)
    assert lines["Adam m, v of the adapter"] == 8 * lora.adapter_params


def test_lora_h200_config_comment_is_the_computed_budget() -> None:
    cfg = load_config("configs/single_h200_lora.yaml")
    s = summary(budget(cfg, ModelShape.from_hf_config(QWEN25_14B, cfg.model.lora), gpu_gb=141))
    text = Path("configs/single_h200_lora.yaml").read_text()
    gpu = re.search(r"= (\d+) of 141 GB", text)
    start = re.search(r"(\d+) GB at start-up", text)
    assert gpu and start, "the budget lines in configs/single_h200_lora.yaml changed shape"
    assert int(gpu.group(1)) == round(s["gpu_shared_peak_gb"]) and s["gpu_shared_peak_gb"] < 141
    assert int(start.group(1)) == round(s["host_start_gb"])
