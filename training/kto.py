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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ingest.config import parse_config
from training import common, registry
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


def load_rows(cfg: Config, version: str):  # -> (train, heldout | None) as datasets.Dataset
    """The version's unpaired rows of weight > 0 (weight 0 means absent), at most max_train_rows."""
    train = common.load_preferences(version, "kto", "train")
    if train is None:
        raise ValueError(f"dataset {version} has no kto/train rows; run training.dpo instead or rebuild the dataset")
    train = train.filter(lambda r: r["weight"] > 0)
    if cfg.max_train_rows > 0:
        train = train.select(range(min(cfg.max_train_rows, len(train))))
    return train, common.load_preferences(version, "kto", "eval")


def training_args(cfg: Config, hw: common.Hardware, out: Path, d_weight: float, u_weight: float):  # -> KTOConfig
    from trl import KTOConfig

    return KTOConfig(
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


def main(cfg: Config) -> dict[str, Any]:
    from trl import KTOTrainer

    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("kto", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done
    train, heldout = load_rows(cfg, version)
    n_desirable = sum(train["label"])
    d_weight, u_weight = balanced_weights(n_desirable, len(train) - n_desirable) if cfg.balance_classes else (1.0, 1.0)

    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    start = common.resolve_start(cfg.init_from, cfg.registry_model, cfg.base_model, out / "start")
    model, tokenizer, peft_config = common.load_policy(cfg.base_model, hw, start, cfg.lora)
    metrics_cb = common.MlflowMetrics(hw.device)
    trainer = KTOTrainer(model=model, args=training_args(cfg, hw, out, d_weight, u_weight), train_dataset=train,
                         eval_dataset=heldout, processing_class=tokenizer, peft_config=peft_config, callbacks=[metrics_cb])

    tags = {"trainer": "kto", "dataset_version": version, "base_model": cfg.base_model, "start": start.label,
            **hw.tags()}
    is_main = common.is_main_process()
    run_ctx = common.start_mlflow_run(cfg.experiment, cfg.run_name or f"kto-{version}", out, tags) \
        if is_main else contextlib.nullcontext()
    with run_ctx as run:
        import mlflow

        if is_main:  # rank 0 logs; every rank trains
            common.log_inputs(cfg, version, "kto", train, heldout, start, hw,
                              {"desirable_weight": d_weight, "undesirable_weight": u_weight})
        _, after, train_s = common.train_and_measure(trainer, out, cfg.resume, heldout, eval_before=False)
        if not is_main:
            return {}
        final = {**common.run_figures(trainer, train_s, hw), "desirable_weight": d_weight, "undesirable_weight": u_weight,
                 **{"heldout_" + k.removeprefix("eval_").replace("/", "_"): float(v) for k, v in after.items()
                    if k.startswith(("eval_loss", "eval_rewards/", "eval_kl", "eval_logps/"))}}
        mlflow.log_metrics(final, step=trainer.state.global_step)
        result = common.finish_run(trainer, run, out, common.RunInfo("kto", cfg, version, start, hw), final,
                                   metrics_cb.history, ["loss", "rewards_margins", "kl", "tokens_per_s"])
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
