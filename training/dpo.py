"""DPO on a LoRA adapter: dataset version in, registered `candidate` adapter out (the gate decides on it).

    python -m training.dpo --config training/configs/dpo.yaml dataset_version=<V> [key=value ...]
    accelerate launch -m training.dpo --config training/configs/dpo.smollm2.yaml dataset_version=<V>

Starts from the current champion adapter when one is registered (continued training; the champion is
the reference) or from the base model (the adapter-disabled base is the reference). Pairs carry
implicit-signal weights; TRL has no sample weights, so `WeightedDPOTrainer` replaces its loss by the
weighted mean in training/weighted_dpo.py. Checkpoints go to <output_dir>/checkpoints and a re-run
with the same output_dir resumes from the newest one. The last stdout line is a JSON object:
{"run_id", "model_version", "model_uri", "adapter_dir", "dataset_version", "metrics", ...}.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import DPOConfig, DPOTrainer

from ingest.config import parse_config
from training import common, registry, trl_seam, weighted_dpo
from training.weighted_dpo import LOSS_TYPES, weighted_dpo_loss


@dataclass
class LoraSettings:
    """LoRA shape: rank r, scale alpha, dropout, and which modules (all-linear = every Linear but lm_head)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = "all-linear"


@dataclass
class Config:
    """DPO training of a LoRA adapter on a Flywheel dataset version.

    Data:          dataset_version (a version id or `latest`), max_train_pairs (0 = all), use_weights,
                   flip_labels (swap chosen and rejected: a deliberately bad adapter, for the sabotage drill
                   that proves the live canary rolls back what users dislike)
    Model:         base_model (tiny | smollm2 | path | HF id), init_from (champion | base | models:/... | folder),
                   lora.{r, alpha, dropout, target_modules}, reference (start: the adapter training starts
                   from, so each cycle is a step from what users see now | base: the base model, so the
                   margins the champion already has count and a step shrinks as they grow)
    Objective:     loss_type (sigmoid | ipo | robust), beta, label_smoothing (robust: assumed label-flip rate),
                   sft_alpha (weight of the chosen answers' per-token NLL added to the loss; 0 = plain DPO)
    Off-policy:    off_policy (none | clipped_is: each pair's weight times the clipped per-token importance
                   ratio of the start policy to the policy that wrote its answers, from the logged
                   log-probs; see weighted_dpo.importance_weights), is_clip
    Optimisation:  learning_rate, epochs, max_steps (overrides epochs when > 0), batch_size, grad_accum,
                   max_length, warmup_ratio, lr_scheduler, seed
    Speed:         precision (auto | bf16 | fp16 | fp32), threads (CPU threads, 0 = default), precompute_ref,
                   gradient_checkpointing, logging_steps
    Checkpoints:   output_dir ("" = var/runs/dpo/<version>-<config hash>), save_steps, resume (auto | never),
                   force (retrain even if output_dir holds a finished result)
    Tracking:      experiment, run_name, registry_model, registry_alias, register, eval_before
    """

    dataset_version: str = "latest"
    max_train_pairs: int = 0
    use_weights: bool = True
    flip_labels: bool = False
    base_model: str = "tiny"
    init_from: str = "champion"
    reference: str = "start"
    lora: LoraSettings = field(default_factory=LoraSettings)
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_alpha: float = 0.0
    off_policy: str = "none"
    is_clip: float = 2.0
    learning_rate: float = 2e-4
    epochs: float = 3.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    seed: int = 0
    precision: str = "auto"
    threads: int = 0
    precompute_ref: bool = True
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    output_dir: str = ""
    save_steps: int = 50
    resume: str = "auto"
    force: bool = False
    experiment: str = "flywheel-training"
    run_name: str = ""
    registry_model: str = registry.DEFAULT_MODEL_NAME
    registry_alias: str = "candidate"
    register: bool = True
    eval_before: bool = True


# --- the weighted trainer -------------------------------------------------------------------------

def completion_logps(model: torch.nn.Module, model_kwargs: dict[str, Any],
                     labels: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Each sequence's summed log-probability of its completion tokens (labels != -100), and the model
    output (None on the CPU path).

    TRL's fused LM head scores every position on devices without Triton, prompts and padding too
    (fixed tile shapes for compilers), and also computes entropy, mean logit and top-1 for metrics this
    trainer does not log. In eager CPU training that was ~40% of a SmolLM2 step (torch.profiler,
    tests/benchmarks/bench_train_dpo.py). On CPU this runs the backbone and TRL's own chunked
    log-prob kernel on the completion positions only; elsewhere (CUDA, where TRL compacts already,
    or a model wrapped for distribution) it is TRL's forward unchanged.
    """
    from peft import PeftModel

    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    config = getattr(causal_lm, "config", None)
    plain_head = config is not None and not any(
        getattr(config.get_text_config(), k, None) is not None
        for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"))
    if labels.device.type != "cpu" or head is None or not plain_head:
        return trl_seam.fused_head_logps(model, model_kwargs, labels)
    hidden = causal_lm.base_model(**model_kwargs).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    per_token = trl_seam.chunked_logprobs(hidden[mask], head, targets[mask])
    rows = mask.nonzero()[:, 0]
    return per_token.new_zeros(mask.shape[0]).index_add(0, rows, per_token), None


BEHAVIOUR_COLUMNS = ("chosen_logprob", "rejected_logprob")  # the logged log-probs (off_policy=clipped_is)
OFF_POLICY = ("none", "clipped_is")


class WeightedPreferenceCollator(trl_seam.DataCollatorForPreference):
    """TRL's preference collator plus a `weight` tensor (one per pair) and, when the rows carry them,
    the behaviour log-probs (NaN for a user's edit)."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        # No default: a batch without weights means the column was dropped on the way (trl_seam.KeepColumns).
        out["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
        for col in BEHAVIOUR_COLUMNS:
            if col in examples[0]:
                out[col] = torch.tensor([float("nan") if e[col] is None else float(e[col]) for e in examples],
                                        dtype=torch.float32)
        return out


_NOT_MODEL_INPUTS = ("weight", *BEHAVIOUR_COLUMNS)


def _without_weight(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k not in _NOT_MODEL_INPUTS}


def _model_inputs(inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor]:
    """(forward kwargs, labels with -100 outside the completions) of a collated batch."""
    model_kwargs = {k: v for k, v in inputs.items()
                    if k not in (*_NOT_MODEL_INPUTS, "completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
    model_kwargs["use_cache"] = False
    return model_kwargs, inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)


class WeightedDPOTrainer(trl_seam.KeepColumns, DPOTrainer):
    """DPOTrainer whose batch loss is the weighted mean of per-pair losses (weighted_dpo.py).

    Only the loss and the metrics are replaced; tokenisation, reference handling (adapter disabled,
    a frozen copy of the start adapter, or precomputed log-probs), checkpointing and distribution are
    TRL's. Supports loss_type sigmoid | ipo | robust, plus an optional NLL term on the chosen answers.
    Every TRL internal it needs goes through training/trl_seam.py.
    """

    extra_columns = ("weight", *BEHAVIOUR_COLUMNS)  # trl_seam.KeepColumns: TRL would drop them before the collator
    sft_alpha: float = 0.0  # weight of the chosen answers' per-token NLL (RPO); set from Config.sft_alpha
    is_clip: float = 0.0  # > 0: off-policy importance weights clipped to [1/is_clip, is_clip] (Config.off_policy)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        trl_seam.check_trainer(self)

    def compute_ref_log_probs(self, model, inputs):  # noqa: ANN001
        """TRL's reference log-probs (same adapter switching), through completion_logps."""
        inputs = _without_weight(inputs)
        if self.ld_alpha is not None:
            return super().compute_ref_log_probs(model, inputs)
        model_kwargs, labels = _model_inputs(inputs)
        with torch.no_grad(), trl_seam.reference_context(self), self.accelerator.autocast():
            logps, _ = completion_logps(model, model_kwargs, labels)
        return logps.chunk(2, dim=0)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        mode = "train" if self.model.training else "eval"
        weights = inputs["weight"]
        behaviour = [inputs.get(c) for c in BEHAVIOUR_COLUMNS]
        inputs = _without_weight(inputs)
        model_kwargs, labels = _model_inputs(inputs)
        completion_mask = inputs["completion_mask"]
        with self.accelerator.autocast():  # the CPU path below bypasses the autocast accelerate puts on forward
            logps, outputs = completion_logps(model, model_kwargs, labels)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or model, inputs)
        chosen_lr = chosen_logps - ref_chosen.to(chosen_logps.device)
        rejected_lr = rejected_logps - ref_rejected.to(rejected_logps.device)
        lengths = completion_mask[..., 1:].sum(dim=1)
        chosen_len, rejected_len = lengths.chunk(2, dim=0)
        if self.is_clip > 0 and behaviour[0] is not None:
            # The reference is the start policy (the champion when continuing): the one this update improves.
            iw = weighted_dpo.importance_weights(ref_chosen.to(chosen_lr), ref_rejected.to(chosen_lr), *behaviour,
                                                 chosen_len, rejected_len, self.is_clip)
            trl_seam.record_metric(self, mode, "is_weight", iw.mean().item())
            weights = weights.to(iw) * iw
        loss = weighted_dpo_loss(chosen_lr, rejected_lr, weights.to(chosen_lr.device), self.beta,
                                 self.loss_types[0], self.label_smoothing, chosen_len, rejected_len,
                                 sft_alpha=self.sft_alpha, chosen_logps=chosen_logps)

        # Metrics over the pairs that count (weight > 0), gathered across processes.
        acc = self.accelerator.gather_for_metrics
        keep = acc(weights > 0)
        c_rew, r_rew = acc(self.beta * chosen_lr.detach()), acc(self.beta * rejected_lr.detach())
        c_lp, r_lp = acc(chosen_logps.detach()), acc(rejected_logps.detach())
        if keep.any():
            for name, value in (
                    ("rewards/chosen", c_rew[keep].mean()), ("rewards/rejected", r_rew[keep].mean()),
                    ("rewards/margins", (c_rew - r_rew)[keep].mean()),
                    ("rewards/accuracies", (c_rew > r_rew)[keep].float().mean()),
                    ("logps/chosen", c_lp[keep].mean()), ("logps/rejected", r_lp[keep].mean()),
                    # The policy's own preference (which answer it finds likelier), meaningful before training
                    # too, unlike rewards/accuracies, which are ties (0) while the policy equals the reference.
                    ("policy_pref_acc", (c_lp > r_lp)[keep].float().mean())):
                trl_seam.record_metric(self, mode, name, value.item())
        n_tokens = int(acc(inputs["attention_mask"].sum()).sum().item()) if mode == "train" else 0
        trl_seam.count_train_tokens(self, mode, n_tokens)
        return (loss, outputs) if return_outputs else loss


# --- the job ------------------------------------------------------------------------------------------

def _training_args(cfg: Config, hw: common.Hardware, out: Path) -> DPOConfig:
    return DPOConfig(
        output_dir=str(out / "checkpoints"),
        **common.trainer_device_kwargs(hw),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type=cfg.lr_scheduler,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=cfg.max_length,
        precompute_ref_log_probs=cfg.precompute_ref,
        gradient_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        prediction_loss_only=True,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def _heldout(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    """The preference metrics of a Trainer.evaluate() result (not its timings), renamed with `prefix`."""
    keep = ("eval_loss", "eval_rewards/", "eval_logps/", "eval_policy_pref_acc")
    return {prefix + k.removeprefix("eval_"): v for k, v in metrics.items() if k.startswith(keep)}


def load_pairs(cfg: Config, version: str):  # -> (train, heldout | None) as datasets.Dataset
    """The version's DPO pairs: at most max_train_pairs, weights 1 unless use_weights, flipped for the
    sabotage drill (flip_labels)."""
    off_policy = cfg.off_policy != "none"
    train = common.load_preferences(version, "dpo", "train", behaviour=off_policy)
    if train is None:
        raise ValueError(f"dataset {version} has no dpo/train rows; run training.kto instead or rebuild the dataset")
    if cfg.max_train_pairs > 0:
        train = train.select(range(min(cfg.max_train_pairs, len(train))))
    if not cfg.use_weights:
        train = train.map(lambda _: {"weight": 1.0})
    if cfg.flip_labels:  # sabotage: learn the opposite of what the users said
        train = train.map(lambda r: {"chosen": r["rejected"], "rejected": r["chosen"]}
                          | ({"chosen_logprob": r["rejected_logprob"], "rejected_logprob": r["chosen_logprob"]}
                             if off_policy else {}))
    return train, common.load_preferences(version, "dpo", "eval", behaviour=off_policy)


def main(cfg: Config) -> dict[str, Any]:
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={cfg.loss_type!r} is not one of {LOSS_TYPES}")
    if cfg.reference not in ("start", "base"):
        raise ValueError(f"reference={cfg.reference!r}: start | base")
    if cfg.off_policy == "clipped_is" and cfg.reference != "start":
        raise ValueError("off_policy=clipped_is weighs pairs by the start policy, the reference: needs reference=start")
    if cfg.off_policy not in OFF_POLICY or (cfg.off_policy == "clipped_is" and cfg.is_clip <= 1):
        raise ValueError(f"off_policy={cfg.off_policy!r} is_clip={cfg.is_clip}: off_policy is one of {OFF_POLICY}, "
                         f"and clipped_is needs is_clip > 1")
    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("dpo", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done
    train, heldout = load_pairs(cfg, version)

    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    start = common.resolve_start(cfg.init_from, cfg.registry_model, cfg.base_model, out / "start")
    model, tokenizer, peft_config = common.load_policy(cfg.base_model, hw, start, cfg.lora)
    # TRL's default reference for an adapter it is handed is a frozen copy of it ("ref"); an explicit
    # ref_model (the bare base) replaces that when asked for.
    ref_model = common.load_base(cfg.base_model, hw) if cfg.reference == "base" and start.adapter_dir else None
    args = _training_args(cfg, hw, out)
    train = common.share_between_ranks(train, args, out / "data" / "train")
    heldout = common.share_between_ranks(heldout, args, out / "data" / "eval")
    metrics_cb = common.MlflowMetrics(hw.device)
    trainer = WeightedDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=train, eval_dataset=heldout,
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[metrics_cb],
                                 data_collator=WeightedPreferenceCollator(
                                     pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length))
    trainer.sft_alpha = cfg.sft_alpha
    trainer.is_clip = cfg.is_clip if cfg.off_policy == "clipped_is" else 0.0
    common.prepare_for_autocast(trainer.model, hw)

    tags = {"trainer": "dpo", "dataset_version": version, "base_model": cfg.base_model, "start": start.label,
            "reference": "base" if cfg.reference == "base" or start.adapter_dir is None else start.label,
            **hw.tags()}
    is_main = common.is_main_process()
    run_ctx = common.start_mlflow_run(cfg.experiment, cfg.run_name or f"dpo-{version}", out, tags) \
        if is_main else contextlib.nullcontext()
    with run_ctx as run:
        import mlflow

        if is_main:  # rank 0 logs; every rank trains
            common.log_inputs(cfg, version, "dpo", train, heldout, start, hw)
        before, after, train_s = common.train_and_measure(trainer, out, cfg.resume, heldout, cfg.eval_before)
        if not is_main:
            return {}
        final = {**common.run_figures(trainer, train_s, hw), **_heldout(after, "heldout_"),
                 **_heldout(before, "heldout_before_")}
        final = {k.replace("/", "_"): float(v) for k, v in final.items()}
        mlflow.log_metrics(final, step=trainer.state.global_step)
        result = common.finish_run(trainer, run, out, common.RunInfo("dpo", cfg, version, start, hw), final,
                                   metrics_cb.history, ["loss", "rewards_margins", "rewards_accuracies", "tokens_per_s"])
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
