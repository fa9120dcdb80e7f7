"""SFT on a LoRA adapter from the SFT rows of a dataset version: users' edits and strong positives.

    python -m training.sft --config training/configs/sft.yaml dataset_version=<V> [key=value ...]

The first stage of the classic pipeline (SFT -> reward model -> RL): the answers the users wrote
themselves (edits) or liked strongly (thumbed up and copied, or read for long) are imitated with TRL's
`SFTTrainer`, the loss on the answer tokens only (prompt-completion rows). Same shape as dpo.py and
kto.py: starts from the champion adapter when there is one, else from the base; checkpoints in
<output_dir>/checkpoints with resume; MLflow run with the dataset inputs and the held-out loss before
and after; sidecar; registration as `candidate` (tag trainer=sft); the last stdout line is the result
JSON. `preference_retrain` runs it before DPO with the param `sft_first=true`, and DPO then continues
from this adapter (which is also DPO's reference). TRL's SFT has no per-row weights: rows of weight 0
are dropped (weight 0 means absent in the dataset contract), other weights are not used.
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
    """LoRA SFT on a Flywheel dataset version's SFT rows (edits and strong positives).

    Data:          dataset_version (a version id or `latest`), max_train_rows (0 = all)
    Model:         base_model (tiny | smollm2 | path | HF id), init_from (champion | base | models:/... | folder),
                   lora.{r, alpha, dropout, target_modules}
    Optimisation:  learning_rate, epochs, max_steps (> 0 overrides epochs), batch_size, grad_accum, max_length,
                   warmup_ratio, lr_scheduler, seed
    Speed:         precision (auto | bf16 | fp16 | fp32), threads (CPU threads, 0 = default), logging_steps
    Checkpoints:   output_dir ("" = var/runs/sft/<version>-<config hash>), save_steps, resume (auto | never), force
    Tracking:      experiment, run_name, registry_model, registry_alias, register, eval_before
    """

    dataset_version: str = "latest"
    max_train_rows: int = 0
    base_model: str = "tiny"
    init_from: str = "champion"
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 2e-4
    epochs: float = 2.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.0
    lr_scheduler: str = "linear"
    seed: int = 0
    precision: str = "auto"
    threads: int = 0
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


def load_rows(version: str, cfg: Config):  # -> (train, heldout | None) as datasets.Dataset
    """The version's SFT rows of weight > 0, as prompt / completion conversations."""
    train = common.load_preferences(version, "sft", "train")
    if train is None:
        raise ValueError(f"dataset {version} has no sft/train rows (no edits or strong positives in its window); "
                         "train DPO or KTO instead, or rebuild over a longer window")
    train = train.filter(lambda r: r["weight"] > 0)
    if cfg.max_train_rows > 0:
        train = train.select(range(min(cfg.max_train_rows, len(train))))
    return train, common.load_preferences(version, "sft", "eval")


def training_args(cfg: Config, hw: common.Hardware, out: Path):  # -> trl.SFTConfig
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out / "checkpoints"), **common.trainer_device_kwargs(hw),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, warmup_steps=cfg.warmup_ratio,
        lr_scheduler_type=cfg.lr_scheduler, max_length=cfg.max_length, completion_only_loss=True, packing=False,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, eval_strategy="no", prediction_loss_only=True,
        report_to="none", dataloader_num_workers=0,
    )


def main(cfg: Config) -> dict[str, Any]:
    from trl import SFTTrainer

    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("sft", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done
    train, heldout = load_rows(version, cfg)

    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    start = common.resolve_start(cfg.init_from, cfg.registry_model, cfg.base_model, out / "start")
    model, tokenizer, peft_config = common.load_policy(cfg.base_model, hw, start, cfg.lora)
    metrics_cb = common.MlflowMetrics(hw.device)
    columns = ["prompt", "completion"]  # SFTTrainer would try to tokenise any other column
    trainer = SFTTrainer(model=model, args=training_args(cfg, hw, out), train_dataset=train.select_columns(columns),
                         eval_dataset=heldout.select_columns(columns) if heldout is not None else None,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[metrics_cb])

    tags = {"trainer": "sft", "dataset_version": version, "base_model": cfg.base_model, "start": start.label,
            **hw.tags()}
    is_main = common.is_main_process()
    run_ctx = common.start_mlflow_run(cfg.experiment, cfg.run_name or f"sft-{version}", out, tags) \
        if is_main else contextlib.nullcontext()
    with run_ctx as run:
        import mlflow

        if is_main:  # rank 0 logs; every rank trains
            common.log_inputs(cfg, version, "sft", train, heldout, start, hw)
        before, after, train_s = common.train_and_measure(trainer, out, cfg.resume, heldout, cfg.eval_before)
        if not is_main:
            return {}
        final = {**common.run_figures(trainer, train_s, hw), **heldout_figures(before, after)}
        mlflow.log_metrics(final, step=trainer.state.global_step)
        result = common.finish_run(trainer, run, out, common.RunInfo("sft", cfg, version, start, hw), final,
                                   metrics_cb.history, ["loss", "mean_token_accuracy", "tokens_per_s"])
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


def heldout_figures(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Held-out loss and token accuracy on the answers, before and after training."""
    final: dict[str, float] = {}
    for prefix, metrics in (("heldout_", after), ("heldout_before_", before)):
        final.update({prefix + k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                      if k in ("eval_loss", "eval_mean_token_accuracy")})
    return final


if __name__ == "__main__":
    main(parse_config(Config))
