"""Benchmark: DPO training tokens/s, project configuration vs a plain DPOTrainer, same run, same data.

Baseline: TRL's stock `DPOTrainer` as a first script would use it on CPU: fp32, LoRA via peft_config,
reference log-probs computed every step (adapter-disabled forward). Project: `training.dpo`'s
`WeightedDPOTrainer` with the project's settings: bf16 autocast (when the CPU has native bf16) with the
frozen Linear weights stored in bf16 (common.prepare_for_autocast), eager attention on CPU
(common.policy_load_kwargs), log-probs of completion tokens only (dpo.completion_logps), precomputed
reference log-probs. Same model, pairs, LoRA shape, batch size and step count.

Figures (printed, and written to var/bench/train_dpo.json):
  - tokens/s of the training loop (pair tokens: prompt + chosen and prompt + rejected), both settings,
    and the ratio project / baseline (target >= 2.5x). The project's one-off reference precompute is
    reported separately and also folded into an "end-to-end" figure amortised over the job's epochs.
  - achieved GFLOP/s of the project's loop vs the machine's measured matmul peak in the dtype the loop's
    matmuls actually ran in (the Trainer's autocast dtype: bf16 where training.precision chose it, else
    fp32), at the same thread count (target >= 35%). Both peaks are recorded.
    FLOPs = 4 (N - N_head) per token + 4 N_head per completion token (forward 2 + activation-gradient
    backward 2: the base is frozen and LoRA weight gradients are negligible; N = the parameter count,
    N_head = the LM head, tied to the embedding). Only completion positions need logits, and the
    project computes only those, so prompt tokens are not credited with LM-head FLOPs.

Model: FLYWHEEL_BENCH_MODEL (default smollm2; `tiny` for a quick check). Threads:
FLYWHEEL_BENCH_THREADS (default 1: on the shared 2-core machine two spinning OpenMP threads were
slower; set 2 on an idle machine). Steps: FLYWHEEL_BENCH_STEPS (default 4 per setting). The JSON's
"machine" record (tests/benchmarks/_machine.py) says the CPU, its capability, threads and dtype.

    .venv/bin/python -m pytest -q -s tests/benchmarks/bench_train_dpo.py

Measured 2026-11-30 on the 2-core dev machine, quiet (load 1.0), SmolLM2-135M, 1 thread, 4 steps of 8 pairs:
  baseline 57 tok/s (16.5 s/step), project 211 tok/s (4.4 s/step) -> 3.72x (3.24x with the precompute
  amortised over 3 epochs); 98.8 GFLOP/s = 45.9% of the bf16 matmul peak (215 GFLOP/s).
  Before this session's changes (2 threads, same machine): 2.0x and 22-30% of peak. A torch.profiler
  trace of a step then: TRL's fused LM head ~43% (it scores every position on CPU and computes
  entropy/top-1 for metrics), CPU flash-attention backward in bf16 ~11%, autocast copies ~10%.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tests.benchmarks._machine import Target, save

MODEL = os.environ.get("FLYWHEEL_BENCH_MODEL", "smollm2")
THREADS = int(os.environ.get("FLYWHEEL_BENCH_THREADS", "1"))
STEPS = int(os.environ.get("FLYWHEEL_BENCH_STEPS", "4"))
BATCH = 8
EPOCHS = 3  # the demo job's epochs, to amortise the reference precompute in the end-to-end figure


def matmul_peak_gflops(dtype: torch.dtype, n: int = 1024, seconds: float = 2.0) -> float:
    """Best sustained n x n matmul rate over a few timed bursts (the machine's practical peak)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return best


def _rows(n: int) -> list[dict]:
    from training.synthetic import TOPICS, preference_rows

    raw = preference_rows(n, TOPICS, seed=21, split="train")["dpo"]
    return [{"prompt": json.loads(r["prompt_json"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}], "weight": r["weight"]} for r in raw]


def _run(project: bool, rows: list[dict], out: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from ingest import endpoints
    from training import common
    from training.dpo import WeightedDPOTrainer, WeightedPreferenceCollator

    path = endpoints.model_path(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    hw = common.detect_hardware("auto" if project else "fp32")
    load = common.policy_load_kwargs(hw) if project else {"dtype": torch.float32}
    model = AutoModelForCausalLM.from_pretrained(path, **load)
    n_params = sum(p.numel() for p in model.parameters())
    args = DPOConfig(output_dir=str(out), **common.trainer_device_kwargs(hw), per_device_train_batch_size=BATCH,
                     max_steps=STEPS, learning_rate=2e-4, beta=0.1, max_length=256, report_to="none",
                     save_strategy="no", logging_steps=1, gradient_checkpointing=False, seed=0,
                     precompute_ref_log_probs=project, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    ds = Dataset.from_list(rows if project else [{k: v for k, v in r.items() if k != "weight"} for r in rows])
    t0 = time.perf_counter()
    if project:
        trainer = WeightedDPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                                     peft_config=lora, data_collator=WeightedPreferenceCollator(
                                         pad_token_id=tok.pad_token_id, max_length=256))
        common.prepare_for_autocast(trainer.model, hw)
    else:
        trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)
    setup_s = time.perf_counter() - t0  # includes the reference precompute for the project setting
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    tokens = trainer._total_train_tokens
    # Completion tokens: the positions whose log-prob the loss needs (the project's LM head scores only these).
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    completion = int(WeightedPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=256)(examples)
                     ["completion_mask"].sum())
    head = model.get_output_embeddings().weight.numel()
    # The dtype the loop's matmuls ran in: the Trainer's autocast dtype (fp32 when it does not autocast).
    used = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    frozen = next(m.weight.dtype for m in trainer.model.modules()
                  if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    return {"precision": hw.precision, "dtype_used": used, "frozen_linear_dtype": str(frozen), "precompute_ref": project, "train_seconds": train_s, "setup_seconds": setup_s,
            "tokens": tokens, "completion_tokens": completion, "tokens_per_s": tokens / train_s,
            "s_per_step": train_s / STEPS, "n_params": n_params, "n_lm_head": head, "pairs_per_step": BATCH}


@pytest.mark.bench
def test_bench_dpo_tokens_per_second(tmp_path: Path) -> None:
    from ingest import endpoints
    from training import common

    try:
        endpoints.model_path(MODEL)
    except endpoints.ModelNotFound as e:
        pytest.skip(str(e))
    common.set_threads(THREADS)
    rows = _rows(BATCH * STEPS)
    baseline = _run(False, rows, tmp_path / "baseline")
    project = _run(True, rows, tmp_path / "project")
    # Precompute covers each pair once; the job trains EPOCHS passes over them, so amortise over those.
    precompute_per_token = project["setup_seconds"] / max(project["tokens"], 1)
    e2e_tps = project["tokens"] / (project["train_seconds"] + precompute_per_token * project["tokens"] / EPOCHS)
    ratio = project["tokens_per_s"] / baseline["tokens_per_s"]
    peak_bf16 = matmul_peak_gflops(torch.bfloat16)
    peak_fp32 = matmul_peak_gflops(torch.float32)
    # FLOPs actually needed: 4 x (N - LM head) per token through the body (forward 2 + activation-gradient
    # backward 2; the base is frozen), and 4 x LM head only per completion token (no prompt logits).
    body = project["n_params"] - project["n_lm_head"]
    flops = 4 * body * project["tokens"] + 4 * project["n_lm_head"] * project["completion_tokens"]
    achieved = flops / project["train_seconds"] / 1e9
    peaks = {"bf16": peak_bf16, "fp32": peak_fp32}
    if project["dtype_used"] not in peaks:
        pytest.fail(f"no matmul peak measured for {project['dtype_used']}; this bench runs on CPU (bf16 or fp32)")
    peak = peaks[project["dtype_used"]]
    result = {
        "model": MODEL, "threads": THREADS, "steps": STEPS,
        "baseline": baseline, "project": project, "ratio_tokens_per_s": ratio,
        "project_end_to_end_tokens_per_s": e2e_tps, "ratio_end_to_end": e2e_tps / baseline["tokens_per_s"],
        "matmul_peak_gflops": {"bf16": peak_bf16, "fp32": peak_fp32},
        "achieved_gflops": achieved, "peak_dtype": project["dtype_used"], "fraction_of_peak": achieved / peak,
        "fraction_of_each_peak": {k: achieved / v for k, v in peaks.items()},
        "load_average": os.getloadavg(),
        "note": "FLOPs = 4 (N - N_head) per token + 4 N_head per completion token (frozen base, LoRA; the "
                "embedding is tied to the LM head). Shared machine: see load_average.",
    }
    # The 2.5x is mostly bf16 over the fp32 baseline: a CPU without native bf16 trains in fp32 too
    # (training.precision), where only the precomputed reference is left to gain.
    no_bf16 = "" if project["dtype_used"] == "bf16" else f"the project trained in {project['dtype_used']} here"
    targets = [Target("tokens_per_s_vs_plain_fp32_dpotrainer", round(ratio, 2), ">=", 2.5, not_applicable=no_bf16),
               Target("fraction_of_matmul_peak", round(achieved / peak, 3), ">=", 0.35)]
    try:
        save("train_dpo.json", result, dtype=project["dtype_used"], threads=THREADS, targets=targets)
    finally:
        _print_summary(baseline, project, ratio, result, achieved, peak)
    assert ratio > 1.0  # everywhere: the precomputed reference alone must beat recomputing it each step


def _print_summary(baseline: dict, project: dict, ratio: float, result: dict, achieved: float, peak: float) -> None:
    print(f"\nDPO on {MODEL}, {THREADS} thread(s), {STEPS} steps of {BATCH} pairs, load avg {os.getloadavg()[0]:.1f}")
    print(f"  baseline (plain DPOTrainer, fp32, ref every step): {baseline['tokens_per_s']:.0f} tok/s "
          f"({baseline['s_per_step']:.2f} s/step)")
    print(f"  project  ({project['precision']}, precomputed ref):  {project['tokens_per_s']:.0f} tok/s "
          f"({project['s_per_step']:.2f} s/step; precompute {project['setup_seconds']:.1f} s)")
    print(f"  ratio {ratio:.2f}x (target >= 2.5x); end-to-end incl. precompute over {EPOCHS} epochs "
          f"{result['ratio_end_to_end']:.2f}x")
    print(f"  achieved {achieved:.1f} GFLOP/s vs {project['dtype_used']} matmul peak {peak:.1f} GFLOP/s = "
          f"{achieved / peak:.1%} (target >= 35%)")
