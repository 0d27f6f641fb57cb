#!/usr/bin/env bash
# The GPU smoke test and throughput measure of the learner (unsharded and FSDP2) and the HF
# generation engine (see deploy/gpu_smoke.py): needs only
# python3 with torch, transformers and peft; prints JSON with tokens/s, peak memory and MFU.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 deploy/gpu_smoke.py "$@"
