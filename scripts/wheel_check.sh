#!/usr/bin/env bash
# Build the wheel, install it into a fresh virtual environment that cannot see the source tree,
# and run the command line from there: `mxfp8 --help`, the golden curves (package data), the
# LICENSE in the wheel, and a two-step `mxfp8 train`. Catches a file the wheel leaves out.
# Usage: scripts/wheel_check.sh PYTHON [pip options for torch...]   (make wheel-check)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}
shift || true
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
work=build/wheel-check
rm -rf "$work"
mkdir -p "$work/dist" "$work/run"
"$PYTHON" -m pip wheel -q --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/mxfp8-*.whl)
"$PYTHON" -m venv "$work/venv"
venv=$(cd "$work/venv" && pwd)
"$venv/bin/python" -m pip install -q "$@" "$TORCH_SPEC"
"$venv/bin/python" -m pip install -q "$wheel"
cd "$work/run"  # no source tree on the path from here
"$venv/bin/mxfp8" --help > /dev/null
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import mxfp8
from pathlib import Path
from mxfp8.train import golden

assert "site-packages" in mxfp8.__file__, mxfp8.__file__  # the wheel, not the checkout
for recipe in ("bf16", "mxfp8"):
    assert golden.load(recipe)["metrics"], recipe  # package data shipped
files = [str(f) for f in md.files("mxfp8")]
assert any(f.endswith("licenses/LICENSE") for f in files), "LICENSE not in the wheel"
print(f"wheel-check: {mxfp8.__file__}: golden curves and LICENSE present")
PY
"$venv/bin/python" - <<'PY'
lines = [f"Line {i}: to be, or not to be, that is the question; whether tis nobler." for i in range(3000)]
open("corpus.txt", "w").write("\n".join(lines) + "\n")
PY
"$venv/bin/mxfp8" train --data corpus.txt --data.vocab_size 300 --steps 2 --out run \
    --model.d_model 64 --model.n_layers 1 --model.n_heads 2 --model.n_kv_heads 1 \
    --model.ffn_hidden 128 --run.batch_size 2 --run.seq_len 32 --run.progress false \
    --run.compile_quantize false --no-report --data.cache_dir cache
test -f run/summary.json
echo "wheel-check: two-step mxfp8 train from the installed wheel: ok"
