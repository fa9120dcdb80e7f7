"""Every use of TRL's private API in Flywheel, in one place.

Written against trl 1.16.0 (`WRITTEN_AGAINST`). TRL changes these without notice between minor
releases, so nothing else in the repo touches a TRL name that starts with an underscore or lives
outside TRL's public `__init__`; training/dpo.py and kto.py go through the functions below. After a TRL
upgrade, re-read each function against the new `trl/trainer/dpo_trainer.py` and
`trl/kernels/chunked_logprob.py`, then run tests/test_trl_seam.py: it checks that the weighted DPO
trainer with all weights 1 gives stock `DPOTrainer`'s loss, gradients and metrics on one batch, and
fails on purpose when the installed version is not the one this file was written against.

The weighted trainer overrides only public DPOTrainer hooks (`compute_loss`, `compute_ref_log_probs`).
What is private here, and why we use it:
- `Trainer._set_signature_columns_if_needed` / `_signature_columns`: the columns that survive
  `remove_unused_columns`. TRL keeps only its own, so the pair `weight` column would be dropped
  before our collator sees it (`KeepColumns`).
- `DPOTrainer._metrics[mode][name]`: lists TRL averages into each log line (`record_metric`).
- `DPOTrainer._total_train_tokens` (KTOTrainer has the same): the running count TRL logs as
  `num_tokens` (`count_train_tokens`, `train_tokens`).
- `trl.kernels.ChunkedLogProbFunction.apply`: TRL's chunked LM-head log-prob kernel, nine
  positional arguments, no keywords (autograd.Function) (`chunked_logprobs`).
- the `fused_lm_head=True` forward kwarg and its `.log_probs` output, added to the model by
  `DPOTrainer` (trl.trainer.utils.add_fused_lm_head) (`fused_head_logps`, `add_fused_lm_head`).
- `DataCollatorForPreference` (re-exported here): TRL's pair collator, importable only from
  trl.trainer.dpo_trainer.
- `use_adapter`, `is_peft_model`, `disable_gradient_checkpointing` from trl.trainer.dpo_trainer:
  the adapter switching TRL uses for the reference forward (`reference_context`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: F401 - re-exported: not in trl.__init__

WRITTEN_AGAINST = "1.16.0"


def check_trainer(trainer: Any) -> None:
    """Raise at construction, naming this file, when the private attributes used here are gone."""
    missing = [a for a in ("_metrics", "_total_train_tokens", "_signature_columns", "precompute_ref_logps",
                           "ld_alpha", "loss_types") if not hasattr(trainer, a)]
    if missing:
        import trl

        raise RuntimeError(f"trl {trl.__version__} has no DPOTrainer attribute(s) {missing}; training/trl_seam.py "
                           f"was written against trl {WRITTEN_AGAINST}: update it (or pin trl=={WRITTEN_AGAINST})")


class KeepColumns:
    """Trainer mixin: the dataset columns named in `extra_columns` survive `remove_unused_columns`.

    Trainer drops every dataset column not in `_signature_columns` before collation; DPOTrainer sets
    that list to its own columns in `_set_signature_columns_if_needed` (trl 1.16: prompt, chosen,
    rejected, ids, ref log-probs), which Trainer calls lazily on the first dataloader.
    """

    extra_columns: tuple[str, ...] = ()

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        missing = [c for c in self.extra_columns if c not in self._signature_columns]
        if missing:
            self._signature_columns = [*self._signature_columns, *missing]


def record_metric(trainer: Any, mode: str, name: str, value: float) -> None:
    """Append one value to the list TRL averages into the next log line (`train` or `eval`)."""
    trainer._metrics[mode][name].append(value)


def count_train_tokens(trainer: Any, mode: str, n_tokens: int) -> None:
    """Add a batch's tokens to TRL's running count (train only) and log it as `num_tokens`, as stock does.

    Stock divides by the tensor-parallel size (`_tp_size`); Flywheel never trains tensor-parallel.
    """
    if mode == "train":
        trainer._total_train_tokens += n_tokens
    trainer._metrics[mode]["num_tokens"] = [trainer._total_train_tokens]


def train_tokens(trainer: Any) -> int:
    """Tokens (attention mask ones, all processes) trained on so far; restored on resume by TRL."""
    return int(trainer._total_train_tokens)


def chunked_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Per-token log-probabilities of `targets` [N] under the LM head on `hidden` [N, H], by TRL's kernel.

    The kernel streams the vocabulary in chunks (never the [N, V] logits at once) and has its own
    backward. Arguments (trl 1.16): hidden, weight, bias, targets, temperature, chunk_size,
    final_logit_softcapping, logit_scale, outputs; only "log_probs" is asked for, so entropy, mean
    logit and top-1 are not computed.
    """
    from trl.kernels import ChunkedLogProbFunction

    per_token, *_ = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0, 32768,
                                                 None, 1.0, ("log_probs",))
    return per_token


def fused_head_logps(model: torch.nn.Module, model_kwargs: dict[str, Any],
                     labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(summed completion log-probs per sequence, outputs) from TRL's fused-head forward.

    DPOTrainer patches the model so that `fused_lm_head=True` returns per-token `log_probs` of the
    labels (0 where labels == -100); prompt-learning PEFT prepends virtual tokens, hence the slice.
    """
    outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    return outputs.log_probs[:, -(labels.size(1) - 1):].sum(dim=1), outputs


def add_fused_lm_head(model: torch.nn.Module) -> None:
    """Patch `model` the way DPOTrainer does, so `fused_lm_head=True` works outside a trainer (tests)."""
    from trl.trainer.utils import add_fused_lm_head as patch

    patch(model)


def reference_context(trainer: Any) -> contextlib.AbstractContextManager:
    """What TRL wraps the reference forward in: no gradient checkpointing and, for a PEFT policy with no
    separate reference model, the "ref" adapter (a frozen copy of the start adapter) or no adapter."""
    from trl.trainer.dpo_trainer import disable_gradient_checkpointing, is_peft_model, use_adapter

    stack = contextlib.ExitStack()
    stack.enter_context(disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs))
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        stack.enter_context(use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None))
    return stack
