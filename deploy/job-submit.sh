#!/usr/bin/env bash
# Submit a raylight run to a running Ray cluster as a Ray job (docs/deploy.md).
#
# Usage: deploy/job-submit.sh CONFIG [raylight train args...]
#   deploy/job-submit.sh configs/demo.yaml --run-dir /mnt/raylight/runs/demo
# CONFIG is a path inside this checkout (it is uploaded as the job's working directory).
# Give --run-dir an absolute path on the cluster's shared volume (/mnt/raylight in deploy/):
# a relative one lands in the job's temporary copy of the checkout.
#
# Environment:
#   RAY_ADDRESS          the cluster's dashboard, e.g. http://127.0.0.1:8265 (what
#                        `kubectl port-forward svc/raylight-head-svc 8265` or
#                        `ray dashboard deploy/cluster.yaml` opens); Ray's own order applies:
#                        RAY_API_SERVER_ADDRESS, then RAY_ADDRESS, then (KubeRay's submitter
#                        sets it) RAY_DASHBOARD_ADDRESS, else http://127.0.0.1:8265
#   RAY_AUTH_MODE        token unless set: the deploy/ clusters require token authentication
#   RAY_AUTH_TOKEN       the cluster's token (or a file: RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0" >&2  # the comment above
    exit 2
fi
config=$1
shift

if [[ -n ${RAY_API_SERVER_ADDRESS:-} ]]; then
    address=$RAY_API_SERVER_ADDRESS
elif [[ -n ${RAY_ADDRESS:-} ]]; then
    address=$RAY_ADDRESS  # http://host:8265, or a cluster address Ray looks the dashboard up from
else
    address=${RAY_DASHBOARD_ADDRESS:-http://127.0.0.1:8265}
    [[ $address == *://* ]] || address=http://$address  # KubeRay sets host:port
fi
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

cd "$(dirname "$0")/.."  # the checkout is the job's working directory; CONFIG is relative to it
if [[ $config != /* && ! -f $config ]]; then
    echo "job-submit.sh: no $config in $(pwd)" >&2
    exit 2
fi
echo "job-submit.sh: submitting $config to $address" >&2
exec ray job submit --address "$address" --working-dir . -- raylight train "$config" "$@"
