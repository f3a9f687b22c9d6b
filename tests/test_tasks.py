"""SmolLM2-scale tasks: seeded, split without overlap, in the data layer's format, gold scored right by our scorers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from sdft_ray.config import DataConfig
from sdft_ray.data import load_examples
from sdft_ray.evaluate import SCORERS, gold_logprob, score_contains
from sdft_ray.tools.tasks import make_tasks


def _read(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_tasks_are_seeded_disjoint_and_self_consistent(tmp_path: Path) -> None:
    a, b, c = make_tasks(tmp_path / "a", seed=1), make_tasks(tmp_path / "b", seed=1), make_tasks(tmp_path / "c", seed=2)
    assert _read(a["tool_use_train"]) == _read(b["tool_use_train"])
    assert _read(a["tool_use_train"]) != _read(c["tool_use_train"])
    for task, scorer in (("tool_use", "tool_use"), ("answer_tag", "answer_tag")):
        train, ev = _read(a[f"{task}_train"]), _read(a[f"{task}_eval"])
        assert len(train) == 192 and len(ev) == 64
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
        for r in train + ev:  # the demonstration is a correct answer under the task's scorer
            assert SCORERS[scorer](r["golden_response"][0], r["answer"]), r
        # and loads through the data layer like a user's file
        assert len(load_examples(DataConfig(train=a[f"{task}_eval"]))) == 64
    # the unseen-tool eval asks only for tools that no training prompt shows
    from sdft_ray.tools.tasks import TOOLS, UNSEEN_TOOLS

    unseen = _read(a["tool_use_unseen_eval"])
    assert len(unseen) >= 32 and not set(TOOLS) & set(UNSEEN_TOOLS)
    train_text = "".join(r["prompt"] + r["golden_response"][0] for r in _read(a["tool_use_train"]))
    assert not any(name in train_text for name in UNSEEN_TOOLS)
    for r in unseen:
        assert SCORERS["tool_use"](r["golden_response"][0], r["answer"]) and r["answer"].split()[1] in UNSEEN_TOOLS
    wrong = _read(a["tool_use_eval"])[0]["answer"].replace("Action: ", "Action: x")
    assert not SCORERS["tool_use"](wrong, _read(a["tool_use_eval"])[0]["answer"])
    assert not SCORERS["answer_tag"]("<answer>1</answer>", "2")


def test_contains_scorer() -> None:
    assert score_contains("The capital of France is  Paris.", "paris")
    assert not score_contains("I do not know.", "Paris")


def test_gold_logprob_is_the_mean_token_logprob(tiny) -> None:
    from sdft_ray.config import ModelConfig
    from sdft_ray.modeling import load_model

    model = load_model(ModelConfig(path=tiny["model"]), torch.device("cpu")).eval()
    prompts, golds = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]]
    got = gold_logprob(model, 1, prompts, golds, batch=1)
    want = []
    with torch.no_grad():
        for p, g in zip(prompts, golds, strict=True):
            logp = F.log_softmax(model(torch.tensor([p + g])).logits[0], -1)
            want.append(sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(g)) / len(g))
    assert abs(got - sum(want) / 2) < 1e-5
