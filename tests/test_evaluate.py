from __future__ import annotations

import math
from itertools import combinations

import pytest

from sdft_ray.evaluate import pass_at_k, score_answer_tag, score_exact, score_tool_use


def test_answer_tag_scorer() -> None:
    assert score_answer_tag("thinking... <answer> B </answer>", "<answer>B</answer>")
    assert score_answer_tag("<answer>A</answer> then <answer>B</answer>", "B")  # last tag counts
    assert not score_answer_tag("B", "<answer>B</answer>")  # no tag, no credit
    assert not score_answer_tag("<answer>C</answer>", "reasoning <answer>B</answer>")


def test_tool_use_scorer_multiset_and_merged_inputs() -> None:
    gold = 'Action: search\nAction Input: {"q": "x"}\nAction: search\nAction Input: {"page": 2}'
    assert score_tool_use('Action: search\nAction Input: {"page": 2}\nAction: search\nAction Input: {"q": "x"}', gold)
    assert not score_tool_use('Action: search\nAction Input: {"q": "x", "page": 2}', gold)  # one call, not two
    assert not score_tool_use(
        'Action: search\nAction Input: {"q": "x"}\nAction: search\nAction Input: {"page": 3}', gold
    )
    assert not score_tool_use("Action: search\nAction Input: {not json}\nAction: search", gold)


def test_exact_normalizes_whitespace_only() -> None:
    assert score_exact(" a  b\n", "a b") and not score_exact("A b", "a b")


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 6), (4, 4, 2), (7, 1, 3)])
def test_pass_at_k_matches_enumeration(n: int, c: int, k: int) -> None:
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12)


def test_lm_eval_hook_explains_missing_package(tmp_path, capsys) -> None:
    import importlib.util

    from sdft_ray.cli import main

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here; the hook would really run")
    rc = main(["eval", "model.path=m", "data.train=d.jsonl", "--lm-eval", "hellaswag"])
    assert rc == 2 and "pip install 'sdft-ray[eval]'" in capsys.readouterr().err
