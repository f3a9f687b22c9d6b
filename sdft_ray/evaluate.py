"""Evaluation: generation through the rollout actors, task scorers, and unbiased pass@k.

Scorers (docs/algorithm.md): ``answer_tag`` (science: exact match of the text inside <answer>...</answer>),
``tool_use`` (multiset of ``Action:`` names and merged ``Action Input:`` JSON must match), ``exact``,
``contains``, ``humaneval`` (the reply's program passes the problem's tests, run in a sandbox process), ``bfcl``
(BFCL's AST checker on the calls decoded from the reply).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sdft_ray.config import Config
from sdft_ray.data import load_examples, tokenize_examples
from sdft_ray.errors import MissingDependency
from sdft_ray.records import Prompt

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ACTION = re.compile(r"^\s*Action:\s*(.+?)\s*$", re.MULTILINE)
_ACTION_INPUT = re.compile(r"^\s*Action Input:\s*(.+?)\s*$", re.MULTILINE)


def _norm(s: str) -> str:
    return " ".join(s.strip().split())


def score_exact(pred: str, gold: str) -> bool:
    return _norm(pred) == _norm(gold)


def extract_answer(text: str) -> str | None:
    found = _ANSWER.findall(text)
    return _norm(found[-1]) if found else None


def score_answer_tag(pred: str, gold: str) -> bool:
    """Gold may be a bare answer or a full demonstration containing <answer> tags."""
    p = extract_answer(pred)
    g = extract_answer(gold)
    return p is not None and p == (g if g is not None else _norm(gold))


def parse_tool_calls(text: str) -> tuple[Counter, dict[str, Any]] | None:
    """(multiset of action names, merged action inputs) or None if an Action Input is not valid JSON."""
    actions = Counter(a.strip() for a in _ACTION.findall(text))
    merged: dict[str, Any] = {}
    for raw in _ACTION_INPUT.findall(text):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if isinstance(value, dict):
            merged.update(value)
        else:
            merged[f"_{len(merged)}"] = value
    return actions, merged


def score_contains(pred: str, gold: str) -> bool:
    """Short known answers to open questions ("Paris", "seven"): the gold text appears in the reply."""
    return _norm(gold).lower() in _norm(pred).lower()


def score_tool_use(pred: str, gold: str) -> bool:
    p, g = parse_tool_calls(pred), parse_tool_calls(gold)
    return p is not None and g is not None and bool(g[0]) and p == g


def score_humaneval(pred: str, gold: str) -> bool:
    """``gold`` is a HumanEval task id; the reply's program runs against its tests in the sandbox."""
    from sdft_ray.evals import humaneval

    return humaneval.score_batch([pred], [gold])[0]


def score_bfcl(pred: str, gold: str) -> bool:
    """``gold`` names a BFCL record; BFCL's own AST checker judges the calls decoded from the reply."""
    from sdft_ray.evals import bfcl

    return bfcl.score(pred, gold)


SCORERS = {
    "exact": score_exact,
    "answer_tag": score_answer_tag,
    "tool_use": score_tool_use,
    "contains": score_contains,
    "humaneval": score_humaneval,
    "bfcl": score_bfcl,
}


def score_all(scorer: str, preds: list[str], golds: list[str]) -> list[bool]:
    """Every reply scored; HumanEval in one sandbox process for the whole batch instead of one per reply."""
    if scorer == "humaneval":
        from sdft_ray.evals import humaneval

        return humaneval.score_batch(preds, golds)
    return [SCORERS[scorer](p, g) for p, g in zip(preds, golds, strict=True)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_with_engines(
    cfg: Config,
    tokenizer: Any,
    engines: list[Any],
    source: str,
    teacher_prompt: bool = False,
    scorer: str = "",
    keep_answers: bool = False,
) -> dict[str, Any]:
    """Generate for every eval example on the given rollout actors and score against the gold answers.

    ``teacher_prompt``: answer from the teacher's prompt (demonstration in context) instead of the student's.
    ``scorer``: this source's scorer ("" = ``eval.scorer``); tasks in one run may each need their own.
    ``keep_answers``: return every answer with its verdict under "answers", not only the first five.
    """
    import ray

    e = cfg.eval
    examples = load_examples(cfg.data, source)
    if e.max_examples:
        examples = examples[: e.max_examples]
    data = tokenize_examples(examples, tokenizer, cfg.data)
    n = max(1, e.num_samples)
    items = [
        Prompt(
            uid=f"eval-{d.index}-{s}",
            index=d.index,
            prompt_ids=d.teacher_prompt_ids if teacher_prompt else d.prompt_ids,
            teacher_prompt_ids=d.teacher_prompt_ids,
        )
        for d in data
        for s in range(n)
    ]
    greedy = e.greedy and n == 1
    refs = [
        eng.generate.remote(items[i :: len(engines)], cfg.train.seed + 7919 * i, greedy, e.max_new_tokens)
        for i, eng in enumerate(engines)
    ]
    outs = [o for shard in ray.get(refs, timeout=cfg.pipeline.call_timeout_s) for o in shard]
    by_ex: dict[int, list[bool]] = {}
    samples = []
    gold_of = {d.index: (d.answer if d.answer is not None else d.demonstration) or "" for d in data}
    texts = [tokenizer.decode(o.completion_ids, skip_special_tokens=True) for o in outs]
    verdicts = score_all(scorer or e.scorer, texts, [gold_of[o.index] for o in outs])
    for o, text, ok in zip(outs, texts, verdicts, strict=True):
        by_ex.setdefault(o.index, []).append(ok)
        if len(samples) < 5 or keep_answers:
            samples.append({"index": o.index, "output": text, "gold": gold_of[o.index], "correct": ok})
    result: dict[str, Any] = {
        "accuracy": sum(sum(v) / len(v) for v in by_ex.values()) / len(by_ex),
        "examples": len(by_ex),
        "samples": samples[:5],
        **({"answers": samples} if keep_answers else {}),
        "per_example": {i: sum(v) / len(v) for i, v in sorted(by_ex.items())},
    }
    if n > 1:
        for k in sorted({1, min(n, 5), n}):
            result[f"pass@{k}"] = sum(pass_at_k(n, sum(v), k) for v in by_ex.values()) / len(by_ex)
    return result


@contextmanager
def rollout_engines(cfg: Config, model_path: str | None = None) -> Iterator[list[Any]]:
    """Rollout actors on ``model_path`` (default model.path) for the duration of a ``with`` block."""
    import ray

    from actors.rollout import RolloutWorker
    from sdft_ray.cluster import actor_runtime_env, init_ray
    from sdft_ray.precision import decide_for_actors

    init_ray()
    c = copy.deepcopy(cfg)
    if model_path:
        c.model.path = model_path
    r = c.rollout
    env = actor_runtime_env(r.torch_threads, decide_for_actors(c.model.dtype == "auto" and not r.num_gpus))
    actor = ray.remote(RolloutWorker).options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, runtime_env=env)
    engines = [actor.remote(c.to_dict(), i) for i in range(r.num_engines)]
    try:
        yield engines
    finally:
        for eng in engines:
            ray.kill(eng)


def evaluate(cfg: Config, source: str, model_path: str | None = None, keep_answers: bool = False) -> dict[str, Any]:
    """Standalone eval job: start rollout actors on ``model_path`` (default model.path) and score."""
    from sdft_ray.modeling import load_tokenizer

    if not source:
        raise ValueError("nothing to evaluate: pass --data or set data.eval")
    with rollout_engines(cfg, model_path) as engines:
        tok_cfg = copy.deepcopy(cfg.model)
        tok_cfg.path = model_path or cfg.model.path
        return evaluate_with_engines(cfg, load_tokenizer(tok_cfg), engines, source, keep_answers=keep_answers)


def run_lm_eval(model_path: str, tasks: list[str], limit: int | None = None) -> dict[str, Any]:
    """Prior-capability benchmarks (HellaSwag, MMLU, ...) on a checkpoint via lm-eval-harness, if installed."""
    try:
        import lm_eval
    except ImportError as e:
        raise MissingDependency("lm-eval-harness is not installed: pip install 'sdft-ray[eval]'") from e
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_path}", tasks=tasks, limit=limit)
    return res["results"]


def gold_logprob(model: Any, pad: int, prompts: list[list[int]], golds: list[list[int]], batch: int = 8) -> float:
    """Mean over examples of the mean per-token log-prob of the gold answer after each prompt."""
    import torch
    import torch.nn.functional as F

    from sdft_ray.modeling import completion_logits

    means = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            p, g = prompts[i : i + batch], golds[i : i + batch]
            logp = F.log_softmax(completion_logits(model, p, g, pad).float(), -1)
            for j, ids in enumerate(g):
                means.append(logp[j, torch.arange(len(ids)), torch.tensor(ids)].mean().item())
    return sum(means) / len(means)


def teacher_gap(cfg: Config, sources: list[tuple[str, str]], samples: int = 4) -> dict[str, Any]:
    """Before any training, per task: accuracy and mean gold log-prob with the student's prompt vs the teacher's.

    SDFT learns from the difference (arXiv 2605.30070 finds the final gain predicted by it): a teacher no
    better than the student has nothing to teach. ``sources``: (eval file, scorer) pairs.

    Accuracy is measured twice: greedy, and sampled at the rollout temperature (``samples`` per example). The
    sampled one is what SDFT's on-policy rollouts actually see; a gap that exists only greedily reaches the
    student weakly, because the teacher then scores the student's own off-task samples.
    """
    import torch

    from sdft_ray.modeling import load_model, load_tokenizer

    tok = load_tokenizer(cfg.model)
    model = load_model(cfg.model, torch.device("cpu")).eval()
    sampled = copy.deepcopy(cfg)
    sampled.eval.greedy, sampled.eval.num_samples = False, max(1, samples)
    out: dict[str, Any] = {}
    with rollout_engines(cfg) as engines:
        for src, scorer in sources:
            examples = load_examples(cfg.data, src)[: cfg.eval.max_examples or None]
            data = tokenize_examples(examples, tok, cfg.data)
            golds = [d.demonstration_ids for d in data]
            runs = {
                "student": evaluate_with_engines(cfg, tok, engines, src, scorer=scorer),
                "teacher": evaluate_with_engines(cfg, tok, engines, src, True, scorer),
                "student_sampled": evaluate_with_engines(sampled, tok, engines, src, scorer=scorer),
                "teacher_sampled": evaluate_with_engines(sampled, tok, engines, src, True, scorer),
            }
            out[src] = {
                "scorer": scorer,
                "examples": len(data),
                **{f"{k}_accuracy": v["accuracy"] for k, v in runs.items()},
                "temperature": cfg.rollout.temperature,
                "student_gold_logprob": gold_logprob(model, tok.pad_token_id, [d.prompt_ids for d in data], golds),
                "teacher_gold_logprob": gold_logprob(
                    model, tok.pad_token_id, [d.teacher_prompt_ids for d in data], golds
                ),
                # what each prompt makes the model write: a gap (or its absence) is read from these, not guessed
                "samples": {k: v["samples"][:2] for k, v in runs.items()},
            }
    return out
