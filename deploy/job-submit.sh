#!/usr/bin/env bash
# Submit a raylight run to a running Ray head (see README "On a Ray cluster").
# Usage: deploy/job-submit.sh CONFIG [raylight train args...]
# Ray 2.60 heads require token authentication; the client opts in with RAY_AUTH_MODE=token.
set -euo pipefail
config=${1:?usage: deploy/job-submit.sh CONFIG [args...]}
shift
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray job submit --address "${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}" --working-dir . -- \
    raylight train "$config" "$@"
