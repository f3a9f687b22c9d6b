"""A post-hoc second reading of kept HumanEval answers: code blocks whose closing fence is broken still count.

The protocol's scorer (``sdft_ray.evals.humaneval.extract_program``) takes the code from a fenced block and, when
there is none, tests the whole reply. After v3's first runs, SFT's students were seen closing their blocks with
two backticks instead of three, which that rule scores as a syntax error whatever the code. This reading, written
after the results were seen and therefore never the result, takes the code from an opening fence to the next line
that starts with two or more backticks (or the end of the reply), and scores every model's kept answers with it,
the base model's included, through the same sandbox:

    python -m sdft_ray.tools.humaneval_lenient docs/results/v3_qwen0.5b
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from sdft_ray.evals.humaneval import FENCE, extract_program, problems, run_programs

_OPEN = re.compile(r"```[A-Za-z]*[ \t]*\n")
_CLOSE = re.compile(r"^[ \t]*``", re.MULTILINE)


def lenient_reply(reply: str) -> str:
    """The reply rewritten so that the protocol's extractor finds the block: an opened block is closed where its
    broken fence (or the reply) ends. A reply without an opening fence is left as it is."""
    m = _OPEN.search(reply)
    if not m or FENCE.search(reply):  # a block the protocol's extractor already reads
        return reply
    body = reply[m.end() :]
    end = _CLOSE.search(body)
    return f"```python\n{body[: end.start() if end else len(body)]}```"


def rescore(answers: Path) -> tuple[int, int, int]:
    """(passed as kept, passed when read leniently, answers) for one ``humaneval.jsonl`` of kept answers."""
    rows = [json.loads(x) for x in answers.read_text().splitlines() if x.strip()]
    table = problems(None)
    jobs = [(r["gold"], extract_program(lenient_reply(r["output"]), table[r["gold"]])) for r in rows]
    passed = [r["passed"] for r in run_programs(jobs)]
    return sum(r["correct"] for r in rows), sum(passed), len(rows)


def main(argv: list[str] | None = None) -> None:
    root = Path((argv or sys.argv[1:])[0])
    print("| answers | as scored | read leniently | n |\n|---|---|---|---|")
    for path in sorted(root.glob("*/evals/step-*/humaneval.jsonl")):
        kept, lenient, n = rescore(path)
        print(f"| {path.parent.parent.parent.name} {path.parent.name} | {kept / n:.3f} | {lenient / n:.3f} | {n} |")


if __name__ == "__main__":
    main()
