"""Bradley-Terry reward model on the preference pairs, registered as `flywheel-reward`.

    python -m training.reward_model --config training/configs/reward_model.yaml dataset_version=<V>

Backbones: `minilm` (default; the packaged all-MiniLM-L6-v2 encoder, 22.7M params, fast on CPU) reads
(prompt, answer) as a BERT sentence pair; `policy` puts a score head on the policy's base model
(`base_model`) and reads the chat-templated conversation, scored at its last token. Training is TRL's
RewardTrainer (-log sigma(r_chosen - r_rejected)) on pre-tokenised pairs; the held-out pairwise
accuracy is the figure that matters. The model folder (weights, tokenizer, sidecar) is registered as a
new version of `flywheel-reward` with alias `candidate`, and also `champion` when the lower bound of its
held-out accuracy's 95% interval reaches `champion_min_accuracy` (reward models have no release gate of
their own). The preference_retrain DAG trains one per dataset version and judges that version's DPO
candidate with exactly it (`judge=rm:models:/flywheel-reward/<V>`).

`load_scorer(ref_or_path)` gives evaluation and PPO a plain function
`score(prompts_messages, completions) -> list[float]`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ingest import endpoints
from ingest.config import parse_config
from training import common, registry

REWARD_MODEL_NAME = "flywheel-reward"
Scorer = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


@dataclass
class Config:
    """Bradley-Terry reward model training.

    Data:          dataset_version (a version id or `latest`); pairs of weight 0 are left out (weight 0 = absent)
    Model:         backbone (minilm | policy), base_model (the policy base for backbone=policy: tiny | smollm2 | path)
    Optimisation:  learning_rate, epochs, max_steps (> 0 overrides epochs), batch_size, max_length, seed,
                   center_rewards (coefficient pushing mean reward to 0; keeps scores comparable across versions)
    Speed:         precision (auto | bf16 | fp16 | fp32), threads (CPU threads, 0 = default)
    Output:        output_dir ("" = var/runs/reward_model/<version>-<hash>), force
    Tracking:      experiment, run_name, registry_model, registry_alias, champion_min_accuracy, register
    """

    dataset_version: str = "latest"
    backbone: str = "minilm"
    base_model: str = "tiny"
    learning_rate: float = 1e-4
    epochs: float = 2.0
    max_steps: int = 0
    batch_size: int = 16
    max_length: int = 256
    seed: int = 0
    center_rewards: float = 0.01
    precision: str = "auto"
    threads: int = 0
    output_dir: str = ""
    force: bool = False
    experiment: str = "flywheel-training"
    run_name: str = ""
    registry_model: str = REWARD_MODEL_NAME
    registry_alias: str = "candidate"
    champion_min_accuracy: float = 0.6
    register: bool = True


# --- input format: shared by training and scoring ----------------------------------------------------

def render_prompt(messages: list[dict[str, str]]) -> str:
    """A plain-text conversation for encoders without a chat template (MiniLM)."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def encode(tokenizer, input_format: str, prompt: list[dict[str, str]], completion: str,  # noqa: ANN001
           max_length: int) -> list[int]:
    """Token ids of (prompt, completion) as the reward model reads them.

    pair: [CLS] prompt [SEP] completion [SEP], the prompt truncated first (the answer is what is judged).
    chat: the chat template over prompt + assistant answer; the score head reads the last token.
    """
    if input_format == "pair":
        return tokenizer(render_prompt(prompt), completion, truncation="only_first" if max_length else False,
                         max_length=max_length)["input_ids"]
    ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=True,
                                        return_dict=True)["input_ids"]
    return ids[-max_length:]  # keep the end: the answer and its final token, where the score is read


def _text(message_list: Any) -> str:
    return message_list[0]["content"] if isinstance(message_list, list) else str(message_list)


def tokenize_pairs(ds, tokenizer, input_format: str, max_length: int):  # noqa: ANN001 - datasets objects
    def fn(row: dict[str, Any]) -> dict[str, Any]:
        return {"chosen_ids": encode(tokenizer, input_format, row["prompt"], _text(row["chosen"]), max_length),
                "rejected_ids": encode(tokenizer, input_format, row["prompt"], _text(row["rejected"]), max_length)}

    return ds.map(fn, remove_columns=ds.column_names, desc="tokenizing pairs")


# --- held-out accuracy: the figure that says whether this judge may be trusted ---------------------------

HELDOUT_KEYS = ("heldout_accuracy", "heldout_accuracy_ci_low", "heldout_accuracy_ci_high", "heldout_pairs")


def heldout_figures(accuracy: float, n_pairs: int) -> dict[str, float]:
    """Held-out pairwise accuracy with its 95% Wilson interval: on a few dozen eval pairs the point
    estimate is noise (16 pairs at 0.625 span 0.39-0.82), so the gate reads the lower bound."""
    from training.evaluate import wilson_interval

    if n_pairs == 0 or accuracy != accuracy:
        return {"heldout_accuracy": float("nan"), "heldout_accuracy_ci_low": float("nan"),
                "heldout_accuracy_ci_high": float("nan"), "heldout_pairs": float(n_pairs)}
    lo, hi = wilson_interval(accuracy * n_pairs, n_pairs)
    return {"heldout_accuracy": accuracy, "heldout_accuracy_ci_low": lo, "heldout_accuracy_ci_high": hi,
            "heldout_pairs": float(n_pairs)}


# --- model --------------------------------------------------------------------------------------------

def _load_backbone(cfg: Config):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if cfg.backbone == "minilm":
        path, input_format = endpoints.model_path("minilm"), "pair"
    elif cfg.backbone == "policy":
        path, input_format = endpoints.model_path(cfg.base_model), "chat"
    else:
        raise ValueError(f"backbone={cfg.backbone!r} is not one of minilm, policy")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, path, input_format


def training_args(cfg: Config, hw: common.Hardware, out: Path):  # -> trl.RewardConfig
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(out / "checkpoints"), **common.trainer_device_kwargs(hw),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1, max_length=None, seed=cfg.seed, data_seed=cfg.seed,
        center_rewards_coefficient=cfg.center_rewards or None, logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", gradient_checkpointing=False, prediction_loss_only=True,
    )


def figures(trainer: Any, train_s: float, before: dict, after: dict, n_heldout: int,
            hw: common.Hardware) -> dict[str, float]:
    """Mean step loss, time, memory, and the judge's held-out pairwise accuracy with its 95% interval."""
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": sum(losses) / max(len(losses), 1), "train_seconds": train_s,
            "peak_memory_mb": common.peak_memory_mb(hw.device),
            **heldout_figures(after.get("eval_accuracy", float("nan")), n_heldout),
            "heldout_margin": after.get("eval_margin", float("nan")),
            "heldout_before_accuracy": before.get("eval_accuracy", float("nan"))}


def finish(trainer: Any, tokenizer: Any, run: Any, out: Path, cfg: Config, version: str, backbone_path: str,
           input_format: str, final: dict[str, float], history: list[dict[str, float]]) -> dict[str, Any]:
    """Save the model with its sidecar (input format, held-out accuracy), log the curves, register it;
    `champion` only when the accuracy's lower bound reaches champion_min_accuracy."""
    import mlflow

    model_dir = out / "reward_model"
    trainer.model.save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    common.write_sidecar(model_dir, trainer="reward_model", cfg=cfg,
                         base_model=cfg.backbone if cfg.backbone == "minilm" else cfg.base_model,
                         base_model_path=backbone_path, dataset_version=version,
                         extra={"input_format": input_format, "max_length": cfg.max_length,
                                **{k: final[k] for k in HELDOUT_KEYS}})
    plot = common.plot_curves(history, ["loss", "accuracy", "margin"], out / "reward_curves.png", f"reward model {version}")
    if plot:
        mlflow.log_artifact(str(plot), "plots")
    result: dict[str, Any] = {"run_id": run.info.run_id, "model_dir": str(model_dir), "dataset_version": version,
                              "backbone": cfg.backbone, "trainer": "reward_model", "metrics": final,
                              "model_version": None, "model_uri": None, "champion": False}
    if cfg.register:
        ref = registry.register_folder(model_dir, run.info.run_id, name=cfg.registry_model,
                                       alias=cfg.registry_alias or None, artifact_path="reward_model",
                                       tags={"trainer": "reward_model", "dataset_version": version},
                                       description="Reward models (judges) trained on users' preference pairs")
        result.update(model_version=ref.version, model_uri=ref.uri)
        if final["heldout_accuracy_ci_low"] >= cfg.champion_min_accuracy:
            registry.set_alias("champion", ref.version, name=cfg.registry_model)
            result["champion"] = True
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def main(cfg: Config) -> dict[str, Any]:
    from transformers import set_seed
    from trl import RewardTrainer

    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("reward_model", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done
    train = common.load_preferences(version, "dpo", "train")
    heldout = common.load_preferences(version, "dpo", "eval")
    if train is None:
        raise ValueError(f"dataset {version} has no dpo/train pairs to train a reward model on")
    train = train.filter(lambda r: r["weight"] > 0)
    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    set_seed(cfg.seed)  # the score head is initialised at load: the same seed, the same starting judge
    model, tokenizer, backbone_path, input_format = _load_backbone(cfg)
    train_tok = tokenize_pairs(train, tokenizer, input_format, cfg.max_length)
    heldout_tok = tokenize_pairs(heldout, tokenizer, input_format, cfg.max_length) if heldout is not None else None
    metrics_cb = common.MlflowMetrics(hw.device)
    trainer = RewardTrainer(model=model, args=training_args(cfg, hw, out), train_dataset=train_tok,
                            eval_dataset=heldout_tok, processing_class=tokenizer, callbacks=[metrics_cb])
    tags = {"trainer": "reward_model", "dataset_version": version, "backbone": cfg.backbone, **hw.tags()}
    is_main = common.is_main_process()
    run_ctx = common.start_mlflow_run(cfg.experiment, cfg.run_name or f"reward-{version}", out, tags) \
        if is_main else contextlib.nullcontext()
    with run_ctx as run:
        import mlflow

        if is_main:  # rank 0 logs; every rank trains
            common.log_config(cfg, {"backbone_path": backbone_path, "hardware": hw.name})
            common.log_dataset_input(version, "dpo", "train", train, "training")
            if heldout is not None:
                common.log_dataset_input(version, "dpo", "eval", heldout, "evaluation")
        before, after, train_s = common.train_and_measure(trainer, out, "never", heldout_tok, eval_before=True)
        if not is_main:
            return {}
        final = figures(trainer, train_s, before, after, len(heldout_tok or []), hw)
        print(f"reward model: held-out pairwise accuracy {final['heldout_accuracy']:.3f} "
              f"(95% CI {final['heldout_accuracy_ci_low']:.3f}-{final['heldout_accuracy_ci_high']:.3f}, "
              f"{final['heldout_pairs']:.0f} pairs)", flush=True)
        mlflow.log_metrics(final, step=trainer.state.global_step)
        result = finish(trainer, tokenizer, run, out, cfg, version, backbone_path, input_format, final,
                        metrics_cb.history)
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


# --- scoring ------------------------------------------------------------------------------------------

def _local_dir(ref_or_path: str | Path, cache: Path | None) -> Path:
    path = Path(ref_or_path).expanduser()
    if path.is_dir():
        return path
    import mlflow

    ref = registry.resolve(str(ref_or_path), name=REWARD_MODEL_NAME)
    if ref is None:
        raise ValueError(f"no reward model at {ref_or_path!r}: not a folder and not a registered "
                         f"{REWARD_MODEL_NAME} version/alias; train one with `python -m training.reward_model`")
    dst = (cache or endpoints.var_dir() / "cache" / "reward_models") / ref.name / ref.version
    if not (dst / "config.json").is_file():
        dst.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(artifact_uri=ref.source, dst_path=str(dst),
                                            tracking_uri=endpoints.mlflow_tracking_uri())
        inner = dst / Path(ref.source).name
        if inner.is_dir() and not (dst / "config.json").is_file():  # downloaded as dst/reward_model/...
            for item in inner.iterdir():
                item.rename(dst / item.name)
            inner.rmdir()
    return dst


def load_scorer(ref_or_path: str | Path = f"models:/{REWARD_MODEL_NAME}@champion", batch_size: int = 32,
                device: str | None = None, cache: Path | None = None) -> Scorer:
    """A function scoring (prompt messages, completion) pairs with a trained reward model; higher = better.

    `ref_or_path`: a model folder, `models:/flywheel-reward@champion`, `models:/flywheel-reward/3`, or an alias.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = _local_dir(ref_or_path, cache)
    sidecar = registry.read_sidecar(folder)
    input_format, max_length = sidecar.get("input_format", "pair"), int(sidecar.get("max_length", 256))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @torch.no_grad()
    def score(prompts: list[list[dict[str, str]]], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        out: list[float] = []
        for i in range(0, len(prompts), batch_size):
            ids = [encode(tokenizer, input_format, p, c, max_length)
                   for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size], strict=True)]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([x + [pad_id] * (width - len(x)) for x in ids], device=device)
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=device)
            out.extend(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float().tolist())
        return out

    score.sidecar = sidecar  # type: ignore[attr-defined] - its held-out accuracy travels with the scorer
    return score


if __name__ == "__main__":
    main(parse_config(Config))
