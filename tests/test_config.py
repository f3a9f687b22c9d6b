from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sdft_ray.config import ConfigError, load_config

REQ = ["model.path=m", "data.train=d.jsonl"]


def test_defaults_are_the_papers() -> None:
    cfg = load_config(None, REQ)
    assert cfg.loss.divergence == "forward_kl" and cfg.loss.estimator == "full"
    assert cfg.loss.skip_first_tokens == 3 and cfg.loss.importance_clip == 2.0
    assert cfg.teacher.kind == "ema" and cfg.teacher.ema_rate == 0.01
    assert cfg.train.lr == 2e-5 and cfg.train.batch_size == 32 and cfg.train.max_grad_norm == 1.0
    assert cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 1.0 and cfg.rollout.num_rollouts == 1
    assert cfg.data.max_prompt_length == 1024 and cfg.teacher_colocated
    assert not cfg.model.trust_remote_code
    assert cfg.pipeline.max_staleness == 0  # on-policy, as the paper; the speed configs opt into 1


def test_warmup_counts_as_hf() -> None:
    """Same multipliers as transformers' get_cosine_schedule_with_warmup (the official code's scheduler)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from sdft_ray.ds_config import lr_lambda

    for total, ratio in ((20, 0.1), (12, 0.1), (7, 0.3)):
        cfg = load_config(None, [*REQ, f"train.warmup_ratio={ratio}"])
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        hf = get_cosine_schedule_with_warmup(opt, -(-int(ratio * 100) * total // 100), total)
        ours = lr_lambda(cfg, total)
        for step in range(total):
            assert abs(ours(step) - hf.lr_lambdas[0](step)) < 1e-12, (total, ratio, step)


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: a}\ndata: {train: b.jsonl}\ntrain: {lr: 1.0e-4, adam_betas: [0.9, 0.95]}\n")
    cfg = load_config(f, ["train.lr=3e-4", "loss.divergence=reverse_kl", "model.trust_remote_code=true"])
    assert cfg.train.lr == 3e-4 and cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.loss.divergence == "reverse_kl" and cfg.model.trust_remote_code is True


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.lrr=1", "did you mean 'train.lr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("loss.divergence=kl", "loss.divergence='kl'; choose one of"),
        ("train.batch_size=abc", "train.batch_size: expected int"),
        ("train.batch_size=30", "must be divisible"),
        ("loss.estimator=sampled", "only defined for loss.divergence=reverse_kl"),
        ("loss.jsd_alpha=1.0", "loss.jsd_alpha must be in (0, 1)"),
        ("teacher.kind=external", "teacher.external_url"),
        ("train.resume=/nope", "no checkpoint folder"),
        ("teacher.placement=separate", "seq x vocab"),
        ("train.lr=inf", "train.lr=inf: must be a finite number"),
        ("loss.importance_clip=nan", "loss.importance_clip=nan: must be a finite number"),
        ("rollout.temperature=-inf", "rollout.temperature=-inf: must be a finite number"),
        ("rollout.temperature=0.7", "SDFT scores rollouts at temperature 1"),
    ],
)
def test_bad_values_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [*REQ, override])
    assert needle in str(e.value)


def test_required_fields() -> None:
    with pytest.raises(ConfigError, match="model.path is required"):
        load_config(None, [])


def test_shipped_configs_validate(tmp_path: Path) -> None:
    for f in sorted(Path("configs").glob("*.yaml")):
        load_config(f)


def test_extends_reads_the_parent_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model: {path: m}\ndata: {train: d.jsonl}\ntrain: {lr: 1.0e-4, steps: 7}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("extends: ../base.yaml\ntrain: {steps: 9}\n")
    cfg = load_config(tmp_path / "sub" / "child.yaml", ["train.batch_size=8"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.batch_size, cfg.model.path) == (1e-4, 9, 8, "m")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    official = load_config("configs/single_h200_official_shape.yaml")
    assert (official.train.batch_size, official.rollout.num_rollouts) == (4, 8)  # 32 samples, as the paper's 32 x 1
    assert official.model.path == load_config("configs/single_h200.yaml").model.path


def test_ipc_engine_shares_trainer_zeros_gpu_bundle() -> None:
    """Review §9: only trainer 0's CUDA IPC handles are shipped, so the engine is placed in trainer 0's bundle and
    layouts the handles cannot serve are refused up front."""
    from sdft_ray.cluster import trainer_bundles

    h200 = load_config("configs/single_h200.yaml")
    assert h200.weight_transport == "ipc"
    assert trainer_bundles(h200) == [{"CPU": 18, "GPU": 1.0}]  # trainer 0.6 GPU + 16 CPU, engine 0.4 + 2
    two = load_config("configs/single_h200.yaml", ["train.num_trainers=2", "train.batch_size=32"])
    assert trainer_bundles(two)[1] == {"CPU": 16, "GPU": 0.6}  # rank 1 alone
    for bad, needle in [
        ("rollout.num_engines=2", "rollout.num_engines and rollout.tensor_parallel_size must be 1"),
        ("rollout.tensor_parallel_size=2", "rollout.num_engines and rollout.tensor_parallel_size must be 1"),
        ("rollout.num_gpus=0.5", "rollout.num_gpus (0.5) + train.num_gpus (0.6) must be <= 1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(needle)):
            load_config("configs/single_h200.yaml", [bad])
    nccl = load_config("configs/multi_node.yaml")
    assert nccl.weight_transport == "nccl" and all(
        b == {"CPU": nccl.train.num_cpus, "GPU": 1} for b in trainer_bundles(nccl)
    )


def test_progress_lines_show_only_what_the_run_has(tmp_path: Path, capsys) -> None:
    """Job logs get plain progress lines; SFT has no KL, so no `kl=nan` in them."""
    from sdft_ray.metrics import MetricsLogger

    cfg = load_config(None, [*REQ, f"train.output_dir={tmp_path}", "logging.wandb=disabled"])
    logger = MetricsLogger(cfg, total_steps=2)
    logger.log(1, {"loss": 1.5, "kl": float("nan"), "tokens_per_s": 10.0})
    logger.log(2, {"loss": 1.25, "kl": 0.5, "tokens_per_s": 10.0})
    logger.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["step 1/2 loss=1.5 tokens_per_s=10", "step 2/2 loss=1.25 kl=0.5 tokens_per_s=10"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_scorer_choices_are_the_scorers_that_exist() -> None:
    """The config's Literal and evaluate.SCORERS must name the same scorers, or a valid config fails at eval."""
    import typing

    from sdft_ray.config import Scorer
    from sdft_ray.evaluate import SCORERS

    assert set(typing.get_args(Scorer)) == set(SCORERS)
