"""DPO: the weighted loss by hand, weight 0 == absent, a full job against a real MLflow, kill + resume.

Runs on the tiny model (~3M params) and a fabricated dataset in the shared Parquet layout
(training/synthetic.py): chosen answers are bullet lists, rejected ones prose.
"""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ingest import endpoints
from ingest.config import load_config
from tests.conftest import run_killed_at_step
from training import registry
from training.weighted_dpo import importance_weights, pair_losses, weighted_dpo_loss, weighted_mean

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "dpo.yaml"


def _sigmoid_loss(z: float) -> float:
    return math.log1p(math.exp(-z))


# --- pure maths ---------------------------------------------------------------------------------

def test_sigmoid_loss_by_hand() -> None:
    """chosen log-ratio 1, rejected -1, beta 0.5: z = 0.5 * (1 - (-1)) = 1, loss = log(1 + e^-1) = 0.31326."""
    loss = pair_losses(torch.tensor([1.0]), torch.tensor([-1.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)


def test_ipo_loss_by_hand() -> None:
    """IPO normalises by length: 2/4 - (-2)/2 = 1.5; target 1/(2*0.5) = 1; loss = (1.5 - 1)^2 = 0.25."""
    loss = pair_losses(torch.tensor([2.0]), torch.tensor([-2.0]), beta=0.5, loss_type="ipo",
                       chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    assert loss.item() == pytest.approx(0.25)


def test_robust_loss_by_hand() -> None:
    """eps 0.25, z = 1: (0.75 * 0.313262 + 0.25 * log sigma(-1) = -0.25 * 1.313262) / 0.5 = -0.186738."""
    loss = pair_losses(torch.tensor([1.0]), torch.tensor([-1.0]), beta=0.5, loss_type="robust",
                       label_smoothing=0.25)
    assert loss.item() == pytest.approx((0.75 * 0.313262 - 0.25 * 1.313262) / 0.5, abs=1e-6)


def test_weighted_mean_by_hand() -> None:
    """losses [1, 4, 10], weights [1, 3, 0]: (1 + 12 + 0) / 4 = 3.25; all weights scaled by 7: same."""
    losses = torch.tensor([1.0, 4.0, 10.0])
    assert weighted_mean(losses, torch.tensor([1.0, 3.0, 0.0])).item() == pytest.approx(3.25)
    assert weighted_mean(losses, torch.tensor([7.0, 21.0, 0.0])).item() == pytest.approx(3.25)
    assert weighted_mean(losses, torch.zeros(3)).item() == 0.0
    with pytest.raises(ValueError, match=">= 0"):
        weighted_mean(losses, torch.tensor([1.0, -1.0, 0.0]))


def test_zero_weight_pair_has_no_value_or_gradient() -> None:
    """A pair of weight 0 changes neither the batch loss nor any gradient, whatever its log-ratios."""
    c = torch.tensor([0.3, -0.2, 5.0], requires_grad=True)
    r = torch.tensor([0.1, 0.4, -9.0], requires_grad=True)
    loss3 = weighted_dpo_loss(c, r, torch.tensor([1.0, 2.0, 0.0]), beta=0.1)
    loss3.backward()
    c2, r2 = c.detach()[:2].clone().requires_grad_(), r.detach()[:2].clone().requires_grad_()
    loss2 = weighted_dpo_loss(c2, r2, torch.tensor([1.0, 2.0]), beta=0.1)
    loss2.backward()
    assert loss3.item() == pytest.approx(loss2.item())
    assert torch.allclose(c.grad[:2], c2.grad) and torch.allclose(r.grad[:2], r2.grad)
    assert c.grad[2] == 0 and r.grad[2] == 0


def test_sft_term_by_hand() -> None:
    """sft_alpha adds alpha x per-token NLL of the chosen answer to each pair's loss, weighted alike.
    One pair, Δ = 0 (loss log 2), chosen log-prob -6 over 3 tokens (NLL 2/token), alpha 0.5:
    log 2 + 0.5 * 2. A weight-0 pair still contributes nothing."""
    import math

    z = torch.tensor([0.0])
    loss = weighted_dpo_loss(z, z, torch.tensor([1.0]), beta=0.1, chosen_lengths=torch.tensor([3]),
                             rejected_lengths=torch.tensor([3]), sft_alpha=0.5, chosen_logps=torch.tensor([-6.0]))
    assert loss.item() == pytest.approx(math.log(2) + 1.0)
    two = weighted_dpo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1.0, 0.0]), beta=0.1,
                            chosen_lengths=torch.tensor([3, 1]), rejected_lengths=torch.tensor([3, 1]),
                            sft_alpha=0.5, chosen_logps=torch.tensor([-6.0, -100.0]))
    assert two.item() == pytest.approx(loss.item())
    with pytest.raises(ValueError, match="chosen_logps"):
        weighted_dpo_loss(z, z, torch.tensor([1.0]), beta=0.1, sft_alpha=0.5)


def test_importance_weights_by_hand() -> None:
    """Pair 1: chosen -10 under the policy vs -12 when written, 4 tokens (+0.5/token); rejected an edit
    (NaN: no writer) -> e^0.5. Pair 2: both sides 5 nats/token less likely now -> e^-10, clipped to 1/2.
    Pair 3: on-policy (same log-probs) -> 1."""
    nan = float("nan")
    w = importance_weights(torch.tensor([-10.0, -20.0, -7.0]), torch.tensor([-3.0, -20.0, -9.0]),
                           torch.tensor([-12.0, -10.0, -7.0]), torch.tensor([nan, -10.0, -9.0]),
                           torch.tensor([4, 2, 3]), torch.tensor([3, 2, 5]), clip=2.0)
    assert w.tolist() == pytest.approx([math.exp(0.5), 0.5, 1.0])
    assert importance_weights(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([-40.0]), torch.tensor([nan]),
                              torch.tensor([4]), torch.tensor([1]), clip=3.0).item() == pytest.approx(3.0)


# --- the trainer ---------------------------------------------------------------------------------

def test_cpu_completion_logps_match_trl_fused_head(tiny_model: str) -> None:
    """The CPU path of completion_logps (backbone + TRL's chunked kernel on completion positions only)
    gives TRL's fused-head sums, value and gradient, on a LoRA model with padded, masked rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.dpo import completion_logps
    from training.trl_seam import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 500, (4, 12))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0  # left padding
    labels = ids.masked_fill(torch.arange(12) < torch.tensor([[6], [4], [9], [7]]), -100)
    kwargs = {"input_ids": ids, "attention_mask": attention, "use_cache": False}
    mine, none = completion_logps(model, kwargs, labels)
    trl_out = model(**kwargs, labels=labels, fused_lm_head=True)
    want = trl_out.log_probs[:, -11:].sum(dim=1)
    assert none is None
    assert torch.allclose(mine, want, atol=1e-5), (mine, want)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    g_mine = torch.autograd.grad(mine.sum(), lora)
    g_want = torch.autograd.grad(want.sum(), lora)
    for a, b in zip(g_mine, g_want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_prepare_for_autocast_keeps_the_numbers(tiny_model: str) -> None:
    """Frozen Linear weights stored in bf16, LoRA input casts off: under bf16 autocast the LoRA model
    gives the same log-probs and LoRA gradients as before; LoRA weights, embeddings and head stay fp32."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from training.common import Hardware, prepare_for_autocast
    from training.dpo import completion_logps

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(3, 500, (2, 10))
    labels = ids.masked_fill(torch.arange(10) < 4, -100)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    lora = [p for n, p in model.named_parameters() if "lora_" in n]

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps, _ = completion_logps(model, kwargs, labels)
        return logps.detach(), [g.detach() for g in torch.autograd.grad(logps.sum(), lora)]

    before, g_before = run()
    converted = prepare_for_autocast(model, Hardware("cpu", "bf16", 1, "test"))
    after, g_after = run()
    assert converted > 0
    assert all(p.dtype == torch.float32 for p in lora)
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    assert torch.allclose(before, after, atol=1e-3), (before, after)
    for a, b in zip(g_before, g_after, strict=True):
        assert torch.allclose(a, b, atol=1e-3, rtol=1e-2)
    assert prepare_for_autocast(model, Hardware("cpu", "fp32", 1, "test")) == 0


def _trainer_run(tiny_model: str, rows: list[dict], out: Path) -> dict[str, torch.Tensor]:
    """A few full-batch steps of WeightedDPOTrainer (no MLflow); returns the trained LoRA tensors."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from training.common import detect_hardware, set_threads
    from training.dpo import Config, WeightedDPOTrainer, WeightedPreferenceCollator, _training_args

    cfg = load_config(Config, CONFIG, ["max_steps=2", f"batch_size={len(rows)}", "precision=fp32",
                                       "save_steps=1000"])
    set_threads(cfg.threads)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    trainer = WeightedDPOTrainer(
        model=model, args=_training_args(cfg, detect_hardware("fp32"), out), train_dataset=Dataset.from_list(rows),
        processing_class=tok, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        data_collator=WeightedPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=128))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ref = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    want = torch.cat(DPOTrainer.compute_ref_log_probs(trainer, trainer.model, {k: v for k, v in batch.items()
                                                                               if k != "weight"}))
    assert torch.allclose(ref, want, atol=1e-5), (ref, want)  # the CPU path gives TRL's reference log-probs
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_" in k}


def test_zero_weight_pair_trains_as_if_absent(tiny_model: str, tmp_path: Path) -> None:
    """Same pairs with and without an extra weight-0 pair (full batches) -> the same LoRA weights."""
    from training.synthetic import TOPICS, preference_rows

    raw = preference_rows(6, TOPICS, seed=3, split="train")["dpo"]
    rows = [{"prompt": json.loads(r["prompt_json"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}], "weight": r["weight"]} for r in raw]
    # The extra pair points the *other* way, so if it leaked into the loss the weights would differ.
    extra = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"], "weight": 0.0}
    without = _trainer_run(tiny_model, rows[1:], tmp_path / "a")
    with_zero = _trainer_run(tiny_model, [*rows[1:], extra], tmp_path / "b")
    with_one = _trainer_run(tiny_model, [*rows[1:], {**extra, "weight": 1.0}], tmp_path / "c")
    zero_diff = max((t - with_zero[n]).abs().max().item() for n, t in without.items())
    one_diff = max((t - with_one[n]).abs().max().item() for n, t in without.items())
    print(f"max |dW|: weight-0 pair {zero_diff:.2e}, weight-1 pair {one_diff:.2e}")
    # Float noise only (the padded width differs, and Adam divides tiny gradients by their own size),
    # while a positive weight on the reversed pair changes the weights for real.
    assert zero_diff < 1e-4
    assert one_diff > 100 * max(zero_diff, 1e-6)


def test_on_policy_answers_weigh_one(tiny_model: str, tmp_path: Path) -> None:
    """The log-prob serving logs for an answer is what training scores for it under the same policy: pairs
    of the base model's own complete answers, scored by the trainer's reference (the base model), get
    importance weights of 1 up to the serving dtype's rounding, through the job's collator."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.engine import Engine
    from training.common import detect_hardware
    from training.dpo import Config, WeightedDPOTrainer, WeightedPreferenceCollator, _training_args

    engine = Engine(tiny_model, max_batch=8, max_wait_ms=0, threads=1)
    try:
        prompt = [{"role": "user", "content": "tell me about rivers"}]
        answers = [engine.generate(prompt, max_tokens=40, temperature=1.0, seed=s) for s in range(24)]
    finally:
        engine.close()
    done = [a for a in answers if a.finish_reason == "stop" and a.text.strip()]
    assert len(done) >= 4, [a.finish_reason for a in answers]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": a.text}],
             "rejected": [{"role": "assistant", "content": b.text}], "weight": 1.0,
             "chosen_logprob": a.logprob, "rejected_logprob": b.logprob} for a, b in zip(done[::2], done[1::2], strict=False)]
    cfg = load_config(Config, CONFIG, ["max_steps=1", "precision=fp32"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trainer = WeightedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model), args=_training_args(cfg, detect_hardware("fp32"), tmp_path),
        train_dataset=Dataset.from_list(rows), processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        data_collator=WeightedPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=256))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    ref_c, ref_r = trainer.compute_ref_log_probs(trainer.model, batch)
    chosen_len, rejected_len = batch["completion_mask"][..., 1:].sum(dim=1).chunk(2)
    w = importance_weights(ref_c, ref_r, batch["chosen_logprob"], batch["rejected_logprob"], chosen_len,
                           rejected_len, clip=2.0)
    assert torch.allclose(w, torch.ones_like(w), atol=0.05), (w, ref_c, batch["chosen_logprob"])
    # Had another policy written them, 0.1 nats/token less likely: each pair weighs e^(0.1 + 0.1) more.
    shifted = importance_weights(ref_c, ref_r, batch["chosen_logprob"] - 0.1 * chosen_len,
                                 batch["rejected_logprob"] - 0.1 * rejected_len, chosen_len, rejected_len, clip=2.0)
    assert torch.allclose(shifted / w, torch.full_like(w, math.exp(0.2)), rtol=1e-3), shifted / w
    trainer.is_clip = 2.0  # what off_policy=clipped_is sets: the loss weighs by them, and logs their mean
    trainer.train()
    logged = [h["is_weight"] for h in trainer.state.log_history if "is_weight" in h]
    assert logged and w.min().item() - 1e-4 <= logged[0] <= w.max().item() + 1e-4, (logged, w)  # a batch's mean


# --- the job ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dpo_dataset(stack) -> str:  # noqa: ANN001 - the conftest stack fixture
    from training.synthetic import write_dataset

    write_dataset(endpoints.var_dir() / "datasets", "ds-test-dpo1", n_train=32, n_eval=12, seed=0)
    return "ds-test-dpo1"


def _run_job(version: str, out: Path, *overrides: str) -> dict:
    from training import dpo

    cfg = load_config(dpo.Config, CONFIG, [f"dataset_version={version}", f"output_dir={out}",
                                           "registry_model=flywheel-test-dpo", *overrides])
    return dpo.main(cfg)


def test_dpo_job_trains_registers_and_continues_from_champion(dpo_dataset: str, tiny_model: str,
                                                              tmp_path: Path, monkeypatch) -> None:
    from training import dpo

    held: dict[str, dict[str, torch.Tensor]] = {}

    class Recording(dpo.WeightedDPOTrainer):
        """The job's own trainer, recording every parameter it holds around train()."""

        def train(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            held["before"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            out = super().train(*args, **kwargs)
            held["after"] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
            return out

    monkeypatch.setattr(dpo, "WeightedDPOTrainer", Recording)
    result = _run_job(dpo_dataset, tmp_path / "first", "precision=fp32")
    monkeypatch.undo()
    adapter = Path(result["adapter_dir"])
    m = result["metrics"]

    # In the trainer's memory: every LoRA tensor moved (B starts at zero), every frozen base tensor did not.
    before, after = held["before"], held["after"]
    lora_names = [n for n in before if "lora_" in n]
    base_names = [n for n in before if "lora_" not in n]
    assert lora_names and len(base_names) > 10
    assert all(not torch.equal(before[n], after[n]) for n in lora_names)
    assert all(torch.equal(before[n], after[n]) for n in base_names)
    # What was saved is what was trained; the sidecar is complete.
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    trained = {n.replace(".default.", "."): t for n, t in after.items() if "lora_" in n}
    assert lora.keys() == trained.keys() and all(torch.equal(lora[k], trained[k]) for k in lora)
    sidecar = json.loads((adapter / registry.SIDECAR).read_text())
    assert sidecar["base_model"] == "tiny" and sidecar["dataset_version"] == dpo_dataset
    assert sidecar["trainer"] == "dpo" and len(sidecar["config_hash"]) == 64
    # Held-out preference rose: the policy now finds the preferred answer likelier on unseen topics.
    assert m["heldout_policy_pref_acc"] > m["heldout_before_policy_pref_acc"] + 0.3
    assert m["heldout_rewards_margins"] > 0 and m["heldout_loss"] < math.log(2)
    # Registered as a new version with alias challenger; MLflow run has metrics, inputs and plots.
    assert result["start_adapter"] == "base"
    assert registry.aliases("flywheel-test-dpo")["candidate"] == result["model_version"]
    run = registry.client().get_run(result["run_id"])
    assert "heldout_rewards_margins" in run.data.metrics and "tokens_per_s" in run.data.metrics
    assert run.data.params["base_model"] == "tiny"
    names = sorted(d.dataset.name for d in run.inputs.dataset_inputs)
    assert names == [f"dpo/eval@{dpo_dataset}", f"dpo/train@{dpo_dataset}"]
    from ingest import reader  # the identity the dataset builder logs: one dataset in MLflow, two runs

    assert {d.dataset.digest for d in run.inputs.dataset_inputs} == \
        {reader.identity(dpo_dataset, "dpo", s)["digest"] for s in ("train", "eval")}
    arts = [a.path for a in registry.client().list_artifacts(result["run_id"], "plots")]
    assert "plots/dpo_curves.png" in arts

    # A DAG retry of the finished job changes nothing.
    assert _run_job(dpo_dataset, tmp_path / "first", "precision=fp32")["model_version"] == result["model_version"]

    # Promote it and train again: continued training from the champion, which is the reference.
    registry.set_alias("champion", result["model_version"], name="flywheel-test-dpo")
    second = _run_job(dpo_dataset, tmp_path / "second", "precision=fp32", "max_steps=2")
    assert second["start_adapter"] == f"flywheel-test-dpo/{result['model_version']}"
    assert int(second["model_version"]) == int(result["model_version"]) + 1
    # At the start the policy equals its reference (the champion): margins 0, but the policy already prefers.
    assert second["metrics"]["heldout_before_rewards_margins"] == pytest.approx(0.0, abs=1e-5)
    assert second["metrics"]["heldout_before_policy_pref_acc"] == m["heldout_policy_pref_acc"]
    # reference=base: the same start, but the margins the champion already has over the base count from
    # the first step: exactly the first run's final held-out margins.
    third = _run_job(dpo_dataset, tmp_path / "third", "precision=fp32", "max_steps=1", "reference=base",
                     "register=false")
    assert third["metrics"]["heldout_before_rewards_margins"] == pytest.approx(m["heldout_rewards_margins"], abs=1e-3)


def test_killed_run_resumes_to_the_same_metrics(dpo_dataset: str, tiny_model: str, tmp_path: Path) -> None:
    """kill -9 after step 5 (checkpoint at 3), re-run -> resumes at 3, ends equal to an unkilled run."""
    common_args = ["max_steps=6", "save_steps=3", "precision=fp32", "register=false", "eval_before=false"]
    unkilled = _run_job(dpo_dataset, tmp_path / "unkilled", *common_args)

    killed_dir = tmp_path / "killed"
    proc = run_killed_at_step("training.dpo", 5, "--config", str(CONFIG), f"dataset_version={dpo_dataset}",
                              f"output_dir={killed_dir}", "registry_model=flywheel-test-dpo", *common_args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed_dir / "checkpoints" / "checkpoint-3").is_dir() and not (killed_dir / "result.json").exists()
    run_id = (killed_dir / "mlflow_run_id").read_text()

    resumed = _run_job(dpo_dataset, killed_dir, *common_args)
    assert resumed["run_id"] == run_id  # the same MLflow run is re-opened
    for key in ("train_loss", "final_step_loss", "heldout_loss", "heldout_rewards_margins", "train_steps"):
        assert resumed["metrics"][key] == pytest.approx(unkilled["metrics"][key], rel=1e-5, abs=1e-6), key
    a = load_file(str(Path(unkilled["adapter_dir"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(resumed["adapter_dir"]) / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_dpo_configs_load() -> None:
    from training.dpo import Config

    for path in sorted((REPO / "training" / "configs").glob("dpo*.yaml")):
        assert path.read_text().startswith("# python -m training.dpo"), path
        load_config(Config, path)
