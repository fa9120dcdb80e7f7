"""Acceptance of the eval suite + gate on the tiny model, against a real MLflow server.

Three LoRA adapters are trained here with TRL's DPOTrainer on fabricated preference pairs over the
tiny model's own synthetic topics (seconds each):

  real     chosen = a bullet list, rejected = prose (the demo users' preference)  -> must pass vs base
  flipped  the same pairs with the labels swapped                                  -> must be rejected
  longer   chosen = long prose, rejected = short prose (no lists)                  -> must fail on length

The judge is the rule judge `uses_list`: these adapters were trained on exactly that rule, so here it
is a judge known to be right, and the gate is told to trust it (`min_judge_accuracy: null`, a test
policy); production judges are reward models whose held-out accuracy decides whether they count. The
tiny model was pre-trained with ~25% list answers, so lists are learnable.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.models import _FACTS, _QUESTIONS, _TOPICS

MODEL = "eval-test-assistant"  # own registered model, so other tests' aliases never interfere


def fabricated_pairs(kind: str, n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        t = rng.choice(_TOPICS)
        q = rng.choice(_QUESTIONS).format(t=t)
        f = rng.sample(_FACTS, 3)
        listed = f"Here are some tips for {t}:\n" + "\n".join(f"- {x.capitalize()}." for x in f)
        prose = f"With {t}, " + ", and ".join(f) + "."
        if kind == "real":
            chosen, rejected = listed, prose
        elif kind == "flipped":
            chosen, rejected = prose, listed
        else:  # longer: same style, only more words
            chosen = (f"With {t}, " + ", and ".join(rng.sample(_FACTS, 6)) + ". "
                      + " ".join(x.capitalize() + "." for x in rng.sample(_FACTS, 4)))
            rejected = f"With {t}, {f[0]}."
        rows.append({"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": rejected}]})
    return rows


def train_tiny_adapter(kind: str, tiny_model: str, out: Path, steps: int = 12, lr: float = 3e-3) -> Path:
    """A LoRA adapter trained with TRL DPOTrainer + PEFT on the tiny model (the adapter-disabled base is the ref)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    args = DPOConfig(output_dir=str(out / f"run-{kind}"), use_cpu=True, bf16=False, per_device_train_batch_size=8,
                     max_steps=steps, learning_rate=lr, beta=0.1, max_length=96, logging_steps=steps,
                     save_strategy="no", report_to=[], gradient_checkpointing=False, seed=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(fabricated_pairs(kind, 8 * steps)),
                         processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                      task_type="CAUSAL_LM"))
    trainer.train()
    folder = out / f"adapter-{kind}"
    trainer.model.save_pretrained(folder)
    (folder / "flywheel_adapter.json").write_text(json.dumps(
        {"base_model": "tiny", "base_model_path": tiny_model, "dataset_version": "", "config_hash": kind,
         "config": {"beta": 0.1, "kind": kind}, "trainer": "dpo"}))
    return folder


DATASET = "evaltest-v1"


def write_eval_split(var: Path) -> None:
    """A held-out DPO split in the shared Parquet layout (chosen = list), fresh prompts (seed 7)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt_id": f"p{i:03d}", "prompt_json": json.dumps(r["prompt"]), "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"], "weight": 1.0, "source": "thumbs"}
            for i, r in enumerate(fabricated_pairs("real", 40, seed=7))]
    folder = var / "datasets" / "dpo" / f"version={DATASET}" / "split=eval"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "part-0.parquet")
    # A version is what has a manifest (evaluate.dataset_rows refuses one without): this one holds eval pairs only.
    counts = {kind: {"train": 0, "eval": len(rows) if kind == "dpo" else 0} for kind in ("dpo", "kto", "sft")}
    (var / "datasets" / "manifests").mkdir(parents=True, exist_ok=True)
    (var / "datasets" / "manifests" / f"{DATASET}.json").write_text(json.dumps({"version": DATASET, "counts": counts}))


@pytest.fixture(scope="module")
def adapters(stack, tiny_model, tmp_path_factory) -> Iterator[dict[str, str]]:
    """kind -> registry URI of the registered adapter version."""
    import mlflow
    import torch

    from training import registry

    # One thread: `make test` runs beside other CPU work, and 2 OpenMP threads on oversubscribed cores
    # made a tiny-model step ~10x slower than 1 thread (measured: 10-16 s vs 1.2 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval-adapters")
    write_eval_split(stack.var)
    mlflow.set_tracking_uri(stack.mlflow)
    mlflow.set_experiment("eval-test-training")
    uris = {}
    # Lists are the minority style (~25%), so un-learning them takes more steps than learning them.
    for kind, steps in (("real", 12), ("flipped", 30), ("longer", 12)):
        t0 = time.monotonic()
        folder = train_tiny_adapter(kind, tiny_model, out, steps=steps)
        with mlflow.start_run(run_name=f"tiny-{kind}") as run:
            ref = registry.register_adapter(folder, run.info.run_id, name=MODEL, alias=None, tags={"kind": kind})
        uris[kind] = f"models:/{MODEL}/{ref.version}"
        print(f"trained + registered {kind} as {ref.label} in {time.monotonic() - t0:.1f}s")
    yield uris
    torch.set_num_threads(threads)


def trusting_policy() -> Path:
    """The committed gate policy, except that the (known-right) rule judge is trusted."""
    import tempfile

    import yaml

    repo = Path(__file__).resolve().parent.parent
    policy = yaml.safe_load((repo / "training/configs/gate.yaml").read_text())
    policy["policy"]["min_judge_accuracy"] = None
    path = Path(tempfile.mkdtemp()) / "gate.trusting.yaml"
    path.write_text(yaml.safe_dump(policy))
    return path


def evaluate(candidate: str, **overrides):  # noqa: ANN201
    from ingest.config import load_config
    from training import evaluate as ev

    repo = Path(__file__).resolve().parent.parent
    cfg = load_config(ev.Config, repo / "training/configs/evaluate.tiny.yaml",
                      [f"candidate={candidate}", "baseline=base", "gate=true", f"gate_config={trusting_policy()}",
                       "n_winrate=40", "n_benign=4",
                       "n_harmful=4", "n_sycophancy=4", "n_regression=4", "max_new_tokens=40", "threads=1"]
                      + [f"{k}={v}" for k, v in overrides.items()])
    return ev.main(cfg)


def test_real_direction_passes_against_base(adapters, capsys):
    from training import registry

    result = evaluate(adapters["real"], dataset_version=DATASET, winrate_prompts="auto")
    m = result["metrics"]
    # Held-out preference accuracy on the dataset's eval split, and its prompts used for the win rate.
    assert m["pref_accuracy"] > 0.8 and m["pref_margin"] > 0 and m["n_pref_pairs"] == 32, m
    assert registry.client().get_run(result["run_id"]).data.tags["flywheel.winrate_source"].startswith("dataset")
    assert m["list_rate_candidate"] > m["list_rate_baseline"] + 0.3, m
    assert m["win_rate_ci_low"] > 0.5 and m["lc_win_rate"] > 0.5
    assert result["gate"]["passed"], result["gate"]["lines"]
    # The evaluation is linked both ways: run -> version tag, version -> eval_run_id, gate tags on the version.
    ref = registry.resolve(adapters["real"])
    assert ref.tags["eval_run_id"] == result["run_id"] and ref.tags["gate.passed"] == "true"
    run = registry.client().get_run(result["run_id"])
    assert run.data.tags["flywheel.candidate_version"] == ref.version
    arts = {a.path for a in registry.client().list_artifacts(result["run_id"], "report")}
    assert {"report/report.md", "report/chart.png", "report/metrics.json"} <= arts
    # The CLI's last line is the JSON result.
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["run_id"] == result["run_id"]
    print(json.dumps(result["gate"], indent=1), f"eval {m['eval_seconds']:.1f}s")


def test_flipped_labels_are_rejected(adapters):
    result = evaluate(adapters["flipped"], dataset_version=DATASET)
    gate = result["gate"]
    assert result["metrics"]["pref_accuracy"] < 0.2
    assert not gate["passed"]
    assert any(ln.startswith("FAIL win_rate_not_worse") for ln in gate["lines"]), gate["lines"]
    assert any(ln.startswith("FAIL preference_accuracy") for ln in gate["lines"]), gate["lines"]
    m = result["metrics"]
    assert m["win_rate"] < 0.5 and m["list_rate_candidate"] < m["list_rate_baseline"], m


def test_only_longer_fails_the_length_rules(adapters):
    result = evaluate(adapters["longer"])
    gate, m = result["gate"], result["metrics"]
    assert not gate["passed"]
    assert m["length_drift"] > 0.5, m
    assert any(ln.startswith("FAIL length_drift") for ln in gate["lines"]), gate["lines"]


def test_gate_cli_reads_the_eval_run(adapters, stack):
    """`python -m training.gate --candidate ...` finds the eval run via the version's eval_run_id tag."""
    import os
    import subprocess
    import sys

    from training import registry

    if "eval_run_id" not in registry.resolve(adapters["flipped"]).tags:  # run alone (-k): evaluate first
        evaluate(adapters["flipped"], gate="false")
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "training.gate", "--candidate", adapters["flipped"]],
                          cwd=repo, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout.strip().splitlines()[-1])
    # The committed policy: a rule judge reports no held-out accuracy, so it abstains ...
    assert decision["lines"][0].startswith("SKIP judge") and decision["offline_evidence"] == "none"
    # ... and the flipped adapter is still stopped, by its held-out implicit-reward accuracy.
    assert decision["passed"] is False and any(ln.startswith("FAIL preference_accuracy") for ln in decision["lines"])


def test_missing_reward_model_says_how_to_evaluate_without_one(stack):
    from training import judges

    with pytest.raises(RuntimeError, match="judge=none"):
        judges.make_judge("rm:models:/flywheel-reward@no-such-alias")


def test_baseline_alias_unset_means_base_and_set_means_that_adapter(adapters):
    """No champion yet -> compared with the base model; a champion adapter -> both adapters on one base."""
    from training import registry

    small = {"n_winrate": 16, "n_benign": 0, "n_harmful": 0, "n_sycophancy": 0, "n_regression": 0, "gate": "false",
             "dataset_version": DATASET, "n_pref_pairs": 8}
    unset = evaluate(adapters["real"], **small, baseline=f"models:/{MODEL}@champion")
    assert unset["baseline"] == "base" and "gate" not in unset
    registry.set_alias("champion", adapters["flipped"].rsplit("/", 1)[1], MODEL)
    try:
        vs = evaluate(adapters["real"], **small, baseline=f"models:/{MODEL}@champion")
    finally:
        registry.delete_alias("champion", MODEL)
    m = vs["metrics"]
    assert vs["baseline"] == f"{MODEL}/{adapters['flipped'].rsplit('/', 1)[1]}"
    assert m["win_rate"] > unset["metrics"]["win_rate"] - 0.1 and m["list_rate_baseline"] < 0.1, m
    assert m["pref_accuracy"] > 0.5 > m["pref_accuracy_baseline"], m
