"""KTO on a LoRA adapter from the unpaired rows (desirable / undesirable answers) of a dataset version.

    python -m training.kto --config training/configs/kto.yaml dataset_version=<V> [key=value ...]

Same shape as training/dpo.py (kept parallel rather than abstracted): starts from the champion adapter
when there is one (it is then the reference) or from the base; TRL's KTOTrainer with precomputed
reference log-probs; checkpoints in <output_dir>/checkpoints with resume; MLflow run, sidecar,
registration as `candidate`; the last stdout line is the result JSON. The desirable / undesirable
weights are balanced from the row counts (`balanced_weights`). TRL's KTO has no per-row weights, so
rows of weight 0 are dropped (weight 0 means absent in the dataset contract) and other weights are
not used; use DPO where the implicit-signal weights matter.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest import endpoints
from ingest.config import parse_config
from training import common, registry, trl_seam
from training.dpo import LoraSettings


@dataclass
class Config:
    """KTO training of a LoRA adapter on a Flywheel dataset version.

    Data:          dataset_version (a version id or `latest`), max_train_rows (0 = all)
    Model:         base_model (tiny | smollm2 | path | HF id), init_from (champion | base | models:/... | folder),
                   lora.{r, alpha, dropout, target_modules}
    Objective:     beta, balance_classes (desirable/undesirable weights from the counts; else both 1)
    Optimisation:  learning_rate, epochs, max_steps (> 0 overrides epochs), batch_size, grad_accum, max_length,
                   warmup_ratio, lr_scheduler, seed
    Speed:         precision (auto | bf16 | fp16 | fp32), threads (CPU threads, 0 = default), precompute_ref,
                   gradient_checkpointing, logging_steps
    Checkpoints:   output_dir ("" = var/runs/kto/<version>-<config hash>), save_steps, resume (auto | never), force
    Tracking:      experiment, run_name, registry_model, registry_alias, register
    """

    dataset_version: str = "latest"
    max_train_rows: int = 0
    base_model: str = "tiny"
    init_from: str = "champion"
    lora: LoraSettings = field(default_factory=LoraSettings)
    beta: float = 0.1
    balance_classes: bool = True
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


def balanced_weights(n_desirable: int, n_undesirable: int) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) making both classes count equally: the rarer class is
    up-weighted by n_common / n_rare, so desirable_weight * n_D == undesirable_weight * n_U (the KTO paper
    recommends that ratio to lie in [1, 4/3]). A missing class leaves both at 1."""
    if n_desirable == 0 or n_undesirable == 0:
        return 1.0, 1.0
    if n_desirable >= n_undesirable:
        return 1.0, n_desirable / n_undesirable
    return n_undesirable / n_desirable, 1.0


def main(cfg: Config) -> dict[str, Any]:
    from trl import KTOConfig, KTOTrainer

    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("kto", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done

    train = common.load_preferences(version, "kto", "train")
    if train is None:
        raise ValueError(f"dataset {version} has no kto/train rows; run training.dpo instead or rebuild the dataset")
    train = train.filter(lambda r: r["weight"] > 0)
    if cfg.max_train_rows > 0:
        train = train.select(range(min(cfg.max_train_rows, len(train))))
    heldout = common.load_preferences(version, "kto", "eval")
    n_desirable = sum(train["label"])
    d_weight, u_weight = balanced_weights(n_desirable, len(train) - n_desirable) if cfg.balance_classes else (1.0, 1.0)

    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    base_path = endpoints.model_path(cfg.base_model)
    start = common.resolve_start(cfg.init_from, cfg.registry_model, cfg.base_model, out / "start")
    model, tokenizer, peft_config = common.load_policy(cfg.base_model, hw, start, cfg.lora)
    args = KTOConfig(
        output_dir=str(out / "checkpoints"), **common.trainer_device_kwargs(hw),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler, beta=cfg.beta, desirable_weight=d_weight, undesirable_weight=u_weight,
        max_length=cfg.max_length, precompute_ref_log_probs=cfg.precompute_ref,
        gradient_checkpointing=cfg.gradient_checkpointing, seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        eval_strategy="no", prediction_loss_only=True, report_to="none", dataloader_num_workers=0,
    )
    metrics_cb = common.MlflowMetrics(hw.device)
    trainer = KTOTrainer(model=model, args=args, train_dataset=train, eval_dataset=heldout,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[metrics_cb])

    tags = {"trainer": "kto", "dataset_version": version, "base_model": cfg.base_model, "start": start.label,
            **hw.tags()}
    is_main = common.is_main_process()
    run_ctx = common.start_mlflow_run(cfg.experiment, cfg.run_name or f"kto-{version}", out, tags) \
        if is_main else contextlib.nullcontext()
    with run_ctx as run:
        import mlflow

        if is_main:  # rank 0 logs; every rank trains
            common.log_config(cfg, {"base_model_path": base_path, "start_adapter": start.label,
                                    "hardware": hw.name, "n_devices": hw.n_devices,
                                    "desirable_weight": d_weight, "undesirable_weight": u_weight})
            common.log_dataset_input(version, "kto", "train", train, "training")
            if heldout is not None:
                common.log_dataset_input(version, "kto", "eval", heldout, "evaluation")
        resume = common.last_checkpoint(out / "checkpoints") if cfg.resume == "auto" else None
        t0 = time.perf_counter()
        trainer.train(resume_from_checkpoint=resume)
        train_s = time.perf_counter() - t0
        after = trainer.evaluate() if heldout is not None else {}
        if not is_main:
            return {}
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        final = {"train_loss": sum(losses) / max(len(losses), 1), "train_seconds": train_s,
                 "train_steps": float(trainer.state.global_step), "peak_memory_mb": common.peak_memory_mb(hw.device),
                 "tokens_per_s": trl_seam.train_tokens(trainer) / max(train_s, 1e-9),
                 "desirable_weight": d_weight, "undesirable_weight": u_weight,
                 **{"heldout_" + k.removeprefix("eval_").replace("/", "_"): float(v) for k, v in after.items()
                    if k.startswith(("eval_loss", "eval_rewards/", "eval_kl", "eval_logps/"))}}
        mlflow.log_metrics(final, step=trainer.state.global_step)

        result = common.finish_run(trainer, run, out, common.RunInfo("kto", cfg, version, start, hw), final,
                                   metrics_cb.history, ["loss", "rewards_margins", "kl", "tokens_per_s"])
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
