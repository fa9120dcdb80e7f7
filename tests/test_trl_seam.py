"""training/trl_seam.py pinned to stock TRL: the weighted DPO trainer, all weights 1, is stock DPOTrainer.

Both trainers get the same tiny LoRA model (adapter weights set to the same random values, so the
policy differs from its adapter-disabled reference and the margins are not all 0) and the same
batch; loss, LoRA gradients and the logged metrics must agree. If a TRL upgrade moves one of the
private names the seam uses, this fails (or the trainer raises naming the seam) instead of training
quietly on a changed loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import trl

from ingest.config import load_config
from training import trl_seam

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "training" / "configs" / "dpo.yaml"
SHARED_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                  "logps/rejected", "num_tokens")


def test_installed_trl_is_the_one_the_seam_was_written_against() -> None:
    """A TRL upgrade must come with a re-read of trl_seam.py: bump WRITTEN_AGAINST only after that."""
    assert trl.__version__ == trl_seam.WRITTEN_AGAINST, (
        f"trl {trl.__version__} installed, training/trl_seam.py was checked against {trl_seam.WRITTEN_AGAINST}")


def _rows(n: int, weight: float = 1.0) -> list[dict]:
    from training.synthetic import TOPICS, preference_rows

    raw = preference_rows(n, TOPICS, seed=5, split="train")["dpo"]
    return [{"prompt": json.loads(r["prompt_json"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}], "weight": weight} for r in raw]


def _trainer(cls: type, tiny_model: str, rows: list[dict], out: Path, loss_type: str, weighted: bool):  # noqa: ANN202
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.common import detect_hardware
    from training.dpo import Config, WeightedPreferenceCollator, _training_args

    cfg = load_config(Config, CONFIG, ["precision=fp32", "precompute_ref=false", f"loss_type={loss_type}",
                                       f"label_smoothing={0.2 if loss_type == 'robust' else 0.0}", "beta=0.5"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    kwargs = {"data_collator": WeightedPreferenceCollator(pad_token_id=tok.pad_token_id, max_length=cfg.max_length)
              } if weighted else {}
    trainer = cls(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=_training_args(cfg, detect_hardware(
        "fp32"), out), train_dataset=Dataset.from_list(rows), processing_class=tok,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), **kwargs)
    # The same adapter in both trainers, far enough from zero that policy and reference differ.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in trainer.model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return trainer


@pytest.mark.parametrize(("loss_type", "weight"), [("sigmoid", 1.0), ("ipo", 1.0), ("robust", 1.0), ("sigmoid", 2.5)])
def test_weighted_dpo_with_equal_weights_is_stock_dpo(tiny_model: str, tmp_path: Path, loss_type: str,
                                                     weight: float) -> None:
    """Equal weights (1, or 2.5: the weighted mean of equal weights is the plain mean) give stock's loss."""
    from trl import DPOTrainer

    from training.dpo import WeightedDPOTrainer

    rows = _rows(6, weight)
    stock = _trainer(DPOTrainer, tiny_model, rows, tmp_path / "stock", loss_type, weighted=False)
    ours = _trainer(WeightedDPOTrainer, tiny_model, rows, tmp_path / "ours", loss_type, weighted=True)
    # Through the dataloader, so the signature-column seam has to keep `weight` for our collator.
    stock_batch = next(iter(stock.get_train_dataloader()))
    our_batch = next(iter(ours.get_train_dataloader()))
    assert torch.equal(our_batch["weight"], torch.full((len(rows),), weight))
    assert torch.equal(stock_batch["input_ids"], our_batch["input_ids"])

    results = {}
    for name, trainer, batch in (("stock", stock, stock_batch), ("ours", ours, our_batch)):
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        lora = sorted((n, p) for n, p in trainer.model.named_parameters() if "lora_" in n)
        grads = torch.autograd.grad(loss, [p for _, p in lora])
        trainer.log({})  # TRL averages its per-mode metric lists into this log line
        results[name] = (loss.detach(), grads, trainer.state.log_history[-1])

    (s_loss, s_grads, s_log), (o_loss, o_grads, o_log) = results["stock"], results["ours"]
    assert s_loss.item() != pytest.approx(math.log(2), abs=1e-3)  # policy != reference: not the trivial value
    assert o_loss.item() == pytest.approx(s_loss.item(), rel=1e-5, abs=1e-6)
    # Float noise only: stock scores every position with its fused head, ours the completions with TRL's kernel.
    for a, b in zip(o_grads, s_grads, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm(), ((a - b).norm(), b.norm())
    assert s_log["rewards/margins"] != 0.0
    for key in SHARED_METRICS:
        assert o_log[key] == pytest.approx(s_log[key], rel=1e-5, abs=1e-6), key
    assert o_log["num_tokens"] == int(stock_batch["attention_mask"].sum())
    assert trl_seam.train_tokens(ours) == o_log["num_tokens"]


def test_seam_names_itself_when_trl_internals_are_gone(tiny_model: str, tmp_path: Path) -> None:
    from trl import DPOTrainer

    trainer = _trainer(DPOTrainer, tiny_model, _rows(2), tmp_path, "sigmoid", weighted=False)
    trl_seam.check_trainer(trainer)  # stock 1.16 has everything
    del trainer._total_train_tokens
    with pytest.raises(RuntimeError, match="trl_seam.py"):
        trl_seam.check_trainer(trainer)
