#!/usr/bin/env bash
# Start the Ray head node. The dashboard (and job API) listens on 127.0.0.1 unless you say otherwise:
#   DASHBOARD_HOST=0.0.0.0 launch/start_head.sh    # only on a trusted network
set -euo pipefail
# Ray clusters here use token auth: the token lives in ~/.ray/auth_token (or $RAY_AUTH_TOKEN_PATH);
# copy that file to every worker node and every machine that submits jobs.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then ray get-auth-token --generate >/dev/null; fi
ray start --head \
  --port "${RAY_PORT:-6379}" \
  --dashboard-host "${DASHBOARD_HOST:-127.0.0.1}" \
  --dashboard-port "${DASHBOARD_PORT:-8265}" \
  ${NUM_CPUS:+--num-cpus "$NUM_CPUS"} ${NUM_GPUS:+--num-gpus "$NUM_GPUS"} "$@"
