#!/usr/bin/env bash
# Creates .venv with sparkgate, the llama-cpp-python engine and (with --test) the test tools,
# and writes the tiny example model. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
# llama-cpp-python compiles llama.cpp from source (~4 min on 2 cores): keep the wheel outside the
# checkout so a fresh clone on the same machine reuses it.
WHEELS=${SPARKGATE_WHEELS:-$HOME/.cache/sparkgate/wheels}
extras=engine
[[ "${1:-}" == "--test" ]] && extras=engine,test

if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip

mkdir -p "$WHEELS"
if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $LLAMA_VERSION (once; about 4 minutes on 2 cores)..."
    start=$(date +%s)
    .venv/bin/python -m pip wheel --quiet --no-deps --wheel-dir "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
    echo "built in $(( $(date +%s) - start ))s"
fi
.venv/bin/python -m pip install --quiet --find-links "$WHEELS" -e ".[$extras]"

.venv/bin/python scripts/make_tiny_gguf.py .cache/tiny-llama.gguf
