#!/usr/bin/env bash
# Join a worker node to the head: launch/start_worker.sh HEAD_IP
set -euo pipefail
head="${1:?usage: start_worker.sh HEAD_IP}"
# Ray clusters here use token auth: the token lives in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH);
# copy that file to every worker node and every machine that submits jobs.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then ray get-auth-token --generate >/dev/null; fi
ray start --address "${head}:${RAY_PORT:-6379}" ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} ${NUM_GPUS:+--num-gpus "$NUM_GPUS"}
