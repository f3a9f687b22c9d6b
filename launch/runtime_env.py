"""Print the job runtime env as JSON: launch/runtime_env.yaml + the submitter's forwarded variables."""

from __future__ import annotations

import json
import os
import sys

import yaml

# Not CUDA_VISIBLE_DEVICES: Ray sets it per actor from the GPUs it assigns; a value from the submitting
# shell would fight that (allenai/open-instruct#1519)
FORWARD_PREFIXES = ("WANDB_", "HF_", "NCCL_", "SDFT_", "OPENAI_")


def runtime_env(base_file: str, environ: dict[str, str]) -> dict:
    with open(base_file) as f:
        env = yaml.safe_load(f) or {}
    env.setdefault("env_vars", {})
    # the submitter's shell wins over the file: `WANDB_MODE=online launch/submit.sh ...` does what it says
    env["env_vars"].update({k: v for k, v in environ.items() if k.startswith(FORWARD_PREFIXES)})
    return env


if __name__ == "__main__":
    print(json.dumps(runtime_env(sys.argv[1], dict(os.environ))))
