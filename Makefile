# Flywheel — the commands a newcomer needs. Everything runs inside .venv (created by `make setup`).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: help setup lock models stack-up stack-down stack-status demo test bench lint vllm test-vllm

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

setup:  ## create/refresh .venv and .venv-airflow from the locks (skipped when unchanged)
	@bash infra/setup.sh

lock:  ## re-resolve pyproject.toml (with its dev extra) into infra/requirements*.lock, with hashes
	@bash infra/lock.sh

models: setup  ## provision SmolLM2-135M-Instruct, the tiny test model and MiniLM under var/models
	$(PY) -m infra.models

stack-up: setup  ## start broker + S3 store + MLflow (STACK_ARGS=--with-airflow for the Airflow UI)
	$(PY) -m infra.stack up $(STACK_ARGS)

stack-down:  ## stop everything the stack started (by pid file)
	@if [ -x $(PY) ]; then $(PY) -m infra.stack down; fi

stack-status:  ## health and endpoints of the stack
	$(PY) -m infra.stack status

demo: setup  ## the whole loop on SmolLM2: traffic -> dataset -> DPO -> eval -> gate -> promote -> traffic
	$(PY) -m infra.demo $(DEMO_ARGS)

test: setup  ## install and run the test suite (tiny model, real broker/Spark/MLflow/Airflow), two workers
	bash infra/setup-browser.sh
	$(PY) -m infra.models
	$(PY) -m ruff check .
	@# two workers on two cores, one OpenMP thread each (more threads than cores spin and slow torch several-fold)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: setup  ## benchmarks under tests/benchmarks, each against its baseline in the same run
	$(PY) -m infra.models
	$(PY) -m pytest -q -s -o python_files="bench_*.py" tests/benchmarks $(PYTEST_ARGS)

vllm:  ## opt-in: vLLM for CPUs in .venv-vllm (~3.5 GB), for test-vllm and backend=vllm without a GPU
	@bash infra/setup-vllm.sh

test-vllm: setup vllm  ## opt-in: the vLLM backend against a real vLLM server (tests/test_serving_vllm_real.py)
	$(PY) -m infra.models
	FLYWHEEL_TEST_VLLM=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/test_serving_vllm_real.py $(PYTEST_ARGS)

lint:  ## ruff
	$(PY) -m ruff check .
