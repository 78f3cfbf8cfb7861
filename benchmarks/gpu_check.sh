#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): at most 8 minutes, one summary table,
# one JSON file. `--cpu-dry-run` runs it at tiny sizes on CPU (the test suite does).
# Usage: bash benchmarks/gpu_check.sh [--cpu-dry-run] [--json FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec timeout 480 "$PY" benchmarks/gpu_check.py "$@"
