"""A teacher model other than the student (``teacher.model_path``, TRL's ``ref_model``): a larger tiny model with
the same tokenizer scores the loss; another tokenizer, or an EMA of another architecture, is refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray
import torch
from conftest import tiny_overrides, toy_samples

from sdft_ray.config import load_config
from sdft_ray.errors import ModelError


@pytest.fixture(scope="module")
def bigger_teacher(tiny, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The testbed's "small" size (4 layers, hidden 128) beside the student's "tiny" (2, 64), same tokenizer."""
    from transformers import AutoTokenizer

    from sdft_ray.tools.testbed import build_model

    out = tmp_path_factory.mktemp("teacher") / "model"
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    tok.save_pretrained(out)
    build_model(out, len(tok), "small", seed=1)
    return str(out)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_frozen_teacher_of_another_size_scores_the_loss(tiny, bigger_teacher, ray_cluster, tmp_path: Path) -> None:
    from actors.trainer import StudentTrainer
    from sdft_ray.losses import sdft_loss
    from sdft_ray.modeling import completion_logits, load_model, load_tokenizer, pad_right

    over = tiny_overrides(tiny, tmp_path, teacher__kind="frozen", teacher__model_path=bigger_teacher)
    cfg = load_config(None, over)
    tr = ray.remote(StudentTrainer).options(num_cpus=0.5).remote(cfg.to_dict(), 4)
    student = load_model(cfg.model, torch.device("cpu"))
    teacher = load_model(cfg.model, torch.device("cpu"), bigger_teacher)
    pad = load_tokenizer(cfg.model).pad_token_id
    held = ray.get(tr.state_dict_cpu.remote("teacher"))  # what the trainer scores with
    assert sum(t.numel() for t in held.values()) == _params(teacher) > 2 * _params(student)
    items = toy_samples()
    # the reference: the loss written out from the module functions, micro-batch by micro-batch as the trainer runs
    lo, mbs = cfg.loss, cfg.train.micro_batch_size

    def reference(t_model: torch.nn.Module) -> float:
        losses = []
        with torch.no_grad():
            for k in range(0, len(items), mbs):
                mb = items[k : k + mbs]
                comps = [m.completion_ids for m in mb]
                s_logits = completion_logits(student, [m.prompt_ids for m in mb], comps, pad)
                t_logits = completion_logits(t_model, [m.teacher_prompt_ids for m in mb], comps, pad).float()
                ids, mask = pad_right(comps, pad)
                out = sdft_loss(
                    s_logits,
                    ids,
                    mask,
                    teacher_logits=t_logits,
                    rollout_logp=torch.tensor([m.rollout_logprobs for m in mb]),
                    skip_first=lo.skip_first_tokens,
                    importance_clip=lo.importance_clip,
                )
                losses.append(out.loss.item())
        return sum(losses) / len(losses)

    want, self_teacher = reference(teacher), reference(student)
    assert abs(want - self_teacher) > 0.05 * want  # the two teachers are told apart far above the tolerance
    try:
        got = ray.get(tr.train_step.remote([ray.put(items)])).loss
    finally:
        ray.kill(tr)
    assert got == pytest.approx(want, rel=1e-4)


def test_teacher_with_another_tokenizer_is_refused_before_any_actor(tiny, bigger_teacher, tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from sdft_ray.driver import SDFTDriver

    other = tmp_path / "other_vocab"
    words = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>").save_pretrained(other)
    AutoModelForCausalLM.from_pretrained(bigger_teacher).save_pretrained(other)
    over = tiny_overrides(tiny, tmp_path / "run", teacher__kind="frozen", teacher__model_path=other)
    with pytest.raises(ModelError, match="its tokenizer differs from the student's"):
        SDFTDriver(load_config(None, over))


def test_ema_teacher_of_another_architecture_is_refused(tiny, bigger_teacher, ray_cluster, tmp_path: Path) -> None:
    from actors.trainer import StudentTrainer

    over = tiny_overrides(tiny, tmp_path, teacher__kind="ema", teacher__model_path=bigger_teacher)
    tr = ray.remote(StudentTrainer).options(num_cpus=0.5).remote(load_config(None, over).to_dict(), 4)
    with pytest.raises(ray.exceptions.RayActorError, match="an EMA teacher must share the student's architecture"):
        ray.get(tr.pid.remote())


def test_separate_teacher_actor_holds_the_other_model(tiny, bigger_teacher, tmp_path: Path) -> None:
    """teacher.placement=separate: the teacher actor's scorer is the other model, not the student's base."""
    from actors.teacher import TeacherWorker
    from sdft_ray.modeling import load_model

    over = tiny_overrides(
        tiny,
        tmp_path,
        teacher__kind="frozen",
        teacher__model_path=bigger_teacher,
        teacher__placement="separate",
        loss__estimator="topk",
    )
    cfg = load_config(None, over)
    worker = TeacherWorker(cfg.to_dict())
    want = load_model(cfg.model, torch.device("cpu"), bigger_teacher)
    assert _params(worker.scorer.model) == _params(want)
    held = dict(worker.scorer.model.named_parameters())
    assert all(torch.equal(held[n], p) for n, p in want.named_parameters())
