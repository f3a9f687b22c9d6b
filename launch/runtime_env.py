"""Print the job runtime env as JSON: launch/runtime_env.yaml + the submitter's forwarded variables."""

from __future__ import annotations

import json
import os
import re
import sys

import yaml

# Not CUDA_VISIBLE_DEVICES: Ray sets it per actor from the GPUs it assigns; a value from the submitting
# shell would fight that (allenai/open-instruct#1519)
FORWARD_PREFIXES = ("WANDB_", "HF_", "NCCL_", "SDFT_", "OPENAI_")
# A job's runtime env is visible to anyone who can list jobs and is written to Ray's logs: secrets never go
# there. They reach actors from the environment `ray start` ran in (launch/start_head.sh, start_worker.sh).
SECRET = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def runtime_env(base_file: str, environ: dict[str, str]) -> tuple[dict, list[str]]:
    """(runtime env, names of secret-looking variables left out)."""
    with open(base_file) as f:
        env = yaml.safe_load(f) or {}
    env.setdefault("env_vars", {})
    forwarded = {k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)}
    secrets = sorted(k for k in forwarded if SECRET.search(k))
    # the submitter's shell wins over the file: `WANDB_MODE=online launch/submit.sh ...` does what it says
    env["env_vars"].update({k: v for k, v in forwarded.items() if k not in secrets})
    return env, secrets


if __name__ == "__main__":
    env, secrets = runtime_env(sys.argv[1], dict(os.environ))
    if secrets:
        print(
            f"submit.sh: not forwarding {', '.join(secrets)}: job metadata and Ray's logs are readable by anyone "
            "who can list jobs. Export them on every node before launch/start_head.sh / start_worker.sh.",
            file=sys.stderr,
        )
    print(json.dumps(env))
