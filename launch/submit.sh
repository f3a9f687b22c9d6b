#!/usr/bin/env bash
# Submit a training job to a running cluster:
#   launch/submit.sh configs/multi_node.yaml train.lr=1e-5
# Uploads this folder as the job's working dir, with launch/runtime_env.yaml, and forwards the submitting
# shell's WANDB_*, HF_*, NCCL_*, SDFT_* and OPENAI_* variables to every actor of the job, except secrets
# (*KEY*, *TOKEN*, *SECRET*, *PASSWORD*): those must be in the environment of `ray start` on every node.
set -euo pipefail
config="${1:?usage: submit.sh CONFIG [key=value ...]}"; shift
# Ray clusters here use token auth: the token lives in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH);
# copy that file from the head to every worker node and every machine that submits jobs. A token generated
# here could never match the head's, so a missing one is an error.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
  echo "submit.sh: no Ray auth token ($token_file); copy it from the head node (or set RAY_AUTH_TOKEN)" >&2
  exit 2
fi
address="${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}"
here="$(cd "$(dirname "$0")" && pwd)"
env_json="$(python "$here/runtime_env.py" "$here/runtime_env.yaml")"
# The upload is what runtime_env.yaml excludes, not .gitignore: the embedded tiny/ model and data are ignored
# by git yet needed by the job.
export RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1
exec ray job submit --address "$address" --working-dir "$(dirname "$here")" --runtime-env-json "$env_json" \
  -- python -m sdft_ray.cli train --config "$config" "$@"
