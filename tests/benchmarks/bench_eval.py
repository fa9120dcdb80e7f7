"""Benchmark: eval-suite wall time and prompts/s on the tiny model and on SmolLM2-135M.

Baseline (same run, same prompts, same seeds): the suite with unbatched generation (batch_size=1),
i.e. what a naive loop over prompts would cost. Ratio = baseline seconds / batched seconds. The
candidate is a LoRA adapter with random (non-zero) weights: generation cost does not depend on
what the adapter learned. Results go to var/bench/eval.json. A report: it has no target, and fails
only if batching is slower than half the naive loop.

Threads: FLYWHEEL_BENCH_THREADS (default 1). On the shared 2-core dev machine the cores are
oversubscribed, and 2 spinning OpenMP threads were ~10x slower than 1 on the tiny model; set 2 on
an idle machine. Both settings run in dtype auto (training.precision: bf16 where the CPU has it
natively, else fp32); each entry's "machine" record (tests/benchmarks/_machine.py) says the CPU, its
capability, the threads and the dtype the suite actually ran in.

    make bench PYTEST_ARGS="-k eval"       # or: .venv/bin/python -m pytest -q -s tests/benchmarks/bench_eval.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.benchmarks._machine import BENCH_DIR, machine

REPO = Path(__file__).resolve().parents[2]
THREADS = int(os.environ.get("FLYWHEEL_BENCH_THREADS", "1"))
SUITE = {  # small enough for ~1-2 min per setting on SmolLM2 with 2 cores
    "tiny": {"n_winrate": 32, "n_benign": 8, "n_harmful": 8, "n_sycophancy": 8, "n_regression": 8,
             "max_new_tokens": 48, "dtype": "auto", "batched": 48},
    "smollm2": {"n_winrate": 16, "n_benign": 4, "n_harmful": 4, "n_sycophancy": 4, "n_regression": 4,
                "max_new_tokens": 64, "dtype": "auto", "batched": 16},
}


def random_adapter(base_path: str, base_model: str, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():  # small random deltas: the adapter must change outputs a little, not wreck them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    model.save_pretrained(out)
    (out / "flywheel_adapter.json").write_text(json.dumps({"base_model": base_model, "trainer": "bench"}))
    return out


def run_suite(candidate: Path, base_model: str, batch_size: int, settings: dict) -> dict:
    from ingest.config import load_config
    from training import evaluate as ev

    overrides = [f"{k}={v}" for k, v in settings.items() if k != "batched"]
    cfg = load_config(ev.Config, REPO / "training/configs/evaluate.yaml", overrides + [
        f"candidate={candidate}", "baseline=base", f"base_model={base_model}", "judge=rule:uses_list",
        "winrate_prompts=file", "dataset_version=none", f"batch_size={batch_size}", "experiment=bench-eval",
        f"threads={THREADS}"])
    t0 = time.monotonic()
    result = ev.main(cfg)
    wall = time.monotonic() - t0
    m = result["metrics"]
    n = settings["n_winrate"] + sum(settings[k] for k in ("n_benign", "n_harmful", "n_sycophancy", "n_regression"))
    return {"wall_s": round(wall, 2), "suite_s": round(m["eval_seconds"], 2), "prompts": n,
            "generations": 2 * n, "prompts_per_s": round(n / wall, 3),
            "generations_per_s": round(m["prompts_per_second"], 3), "batch_size": batch_size,
            "dtype": result["precision"]["dtype"]}


@pytest.mark.bench
@pytest.mark.parametrize("base_model", ["tiny", "smollm2"])
def test_bench_eval_suite(stack, tmp_path, base_model):
    import torch

    from ingest import endpoints

    torch.set_num_threads(THREADS)
    settings = SUITE[base_model]
    adapter = random_adapter(endpoints.model_path(base_model), base_model, tmp_path / "adapter")
    batched = run_suite(adapter, base_model, settings["batched"], settings)
    unbatched = run_suite(adapter, base_model, 1, settings)
    ratio = unbatched["wall_s"] / batched["wall_s"]
    assert batched["dtype"] == unbatched["dtype"]
    record = {"machine": machine(batched["dtype"], THREADS), "model": base_model, "dtype": batched["dtype"],
              "requested_dtype": settings["dtype"], "threads": THREADS, "max_new_tokens": settings["max_new_tokens"],
              "batched": batched, "baseline_unbatched": unbatched, "speedup_vs_unbatched": round(ratio, 2)}
    print(f"\neval suite on {base_model}: {batched['prompts']} prompts x 2 models in {batched['wall_s']:.1f}s "
          f"({batched['prompts_per_s']:.2f} prompts/s, batch {batched['batch_size']}); unbatched baseline "
          f"{unbatched['wall_s']:.1f}s -> {ratio:.2f}x")
    out = BENCH_DIR / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[base_model] = record
    out.write_text(json.dumps(data, indent=2) + "\n")
    assert ratio > 0.5  # a batched suite slower than half the naive loop would be a regression worth a look
