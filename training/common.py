"""Blocks the training jobs share: device/precision, datasets, the start adapter, MLflow tracking, sidecars.

Plain functions, no trainer base class, so that each job stays readable on its own: dpo.py, kto.py,
sft.py, reward_model.py and ppo.py each read top to bottom and call these where they do the same thing.
The LoRA trainers (dpo, kto, sft) share three whole steps: `finished_result` (a finished run is not
run again), `load_policy` (base + tokenizer + the adapter to continue or a fresh LoRA config) and
`finish_run` (adapter, sidecar, curves, registration, result.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from ingest import endpoints
from ingest.config import to_dict
from training import precision as precision_rules
from training import registry

# --- device and precision ---------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """What this process trains on and in which precision."""

    device: str  # "cuda" | "mps" | "cpu"
    precision: str  # "bf16" | "fp16" | "fp32"
    n_devices: int  # processes launched by accelerate/torchrun (WORLD_SIZE), else 1
    name: str
    decision: precision_rules.Precision | None = None  # what the precision was chosen from (logged, recorded)

    def tags(self) -> dict[str, str]:
        """MLflow run tags: the device, the precision and the CPU capability it was chosen from."""
        out = {"device": self.device, "precision": self.precision}
        if self.decision is not None:
            out.update(cpu_model=self.decision.cpu_model, cpu_capability=self.decision.capability,
                       precision_reason=self.decision.reason[:250])
        return out


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (avx512_bf16 / AMX); emulated bf16 is slower than fp32."""
    return bool(precision_rules.read_cpu().native_bf16)


def detect_hardware(precision: str = "auto") -> Hardware:
    """Pick the device and precision (auto | bf16 | fp16 | fp32) with training.precision.decide, and log it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    decision = precision_rules.announce(precision_rules.decide(precision))
    name = decision.gpu or ("Apple MPS" if decision.device == "mps" else
                            f"{decision.cpu_model} ({decision.capability}) x{decision.threads} threads")
    return Hardware(device=decision.device.split(":", 1)[0], precision=decision.dtype, n_devices=world, name=name,
                    decision=decision)


def set_threads(threads: int) -> None:
    """Pin torch's CPU threads (0 = torch's default). For tiny models 1 thread is faster: measured here
    with other jobs on the 2 cores, 16x40-token sampling took 0.4 s on 1 thread and 16 s on 2 (OpenMP
    workers spin-waiting on a busy core)."""
    if threads > 0:
        torch.set_num_threads(threads)


def trainer_device_kwargs(hw: Hardware) -> dict[str, Any]:
    """TrainingArguments keys for `hw`. TRL configs default to bf16 + GPU, so CPU must be explicit."""
    return {"use_cpu": hw.device == "cpu", "bf16": hw.precision == "bf16", "fp16": hw.precision == "fp16"}


def policy_load_kwargs(hw: Hardware) -> dict[str, Any]:
    """from_pretrained keys for a model to train with LoRA on `hw`. Weights load in fp32 (the trainer
    autocasts; see prepare_for_autocast). On CPU attention is the eager one: torch's CPU flash
    attention backward took 31 ms per layer call in bf16 on SmolLM2 batches, ~15% of a DPO step,
    where eager bmm + softmax took ~5 ms (torch.profiler, tests/benchmarks/bench_train_dpo.py)."""
    return {"dtype": torch.float32, **({"attn_implementation": "eager"} if hw.device == "cpu" else {})}


def prepare_for_autocast(model: torch.nn.Module, hw: Hardware) -> int:
    """Two casts that autocast makes redundant, removed from a PEFT-wrapped model (bf16/fp16 only):

    - the frozen nn.Linear weights are stored in the autocast dtype: autocast cast each fp32 weight
      to bf16 on every forward anyway, so the numbers are the same without the copies;
    - PEFT's LoRA layers no longer cast their input to the adapter's fp32 (autocast casts it straight
      back to bf16 for the matmul): two activation copies per LoRA layer.

    Everything else stays fp32: LoRA weights (their updates are small), embeddings and the LM head tied
    to them, norms (the residual stream stays fp32). Returns how many weights were converted.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hw.precision)
    if dtype is None:
        return 0
    from peft.tuners.tuners_utils import BaseTunerLayer

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    n = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False
        if type(module) is torch.nn.Linear and module is not head and not module.weight.requires_grad:
            module.weight.data = module.weight.data.to(dtype)
            if module.bias is not None:
                module.bias.data = module.bias.data.to(dtype)
            n += 1
    return n


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` / torchrun (or a plain process): the one that talks to MLflow,
    writes the adapter and registers it; the other ranks only train."""
    return int(os.environ.get("RANK", "0")) == 0


def peak_memory_mb(device: str) -> float:
    """Peak memory of this process: GPU allocator peak on CUDA, max RSS on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# --- configs, hashes, sidecars ----------------------------------------------------------------

def config_hash(cfg: Any, exclude: tuple[str, ...] = ("output_dir", "run_name")) -> str:
    """sha256 of the settings that change the result (paths and names excluded), for sidecars and resume."""
    tree = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()


def write_sidecar(adapter_dir: Path, *, trainer: str, cfg: Any, base_model: str, base_model_path: str,
                  dataset_version: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `flywheel_adapter.json` (the shared sidecar contract) next to the adapter weights."""
    sidecar = {
        "base_model": base_model,
        "base_model_path": base_model_path,
        "dataset_version": dataset_version,
        "config_hash": config_hash(cfg),
        "config": to_dict(cfg),
        "trainer": trainer,
        **(extra or {}),
    }
    (adapter_dir / registry.SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return sidecar


def default_output_dir(job: str, dataset_version: str, cfg: Any) -> Path:
    """var/runs/<job>/<version>-<hash>: the same data and settings land in the same folder, so a re-run resumes."""
    return endpoints.var_dir() / "runs" / job / f"{dataset_version}-{config_hash(cfg)[:10]}"


def last_checkpoint(checkpoints_dir: Path) -> str | None:
    """The newest complete `checkpoint-N` folder (Trainer writes trainer_state.json last)."""
    if not checkpoints_dir.is_dir():
        return None
    done = [p for p in checkpoints_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def emit_result(result: dict[str, Any]) -> None:
    """The job's last stdout line: one JSON object the DAG parses (run_id, model_version, adapter_dir...)."""
    print(json.dumps(result, sort_keys=True, default=str), flush=True)


def finished_result(out: Path, force: bool) -> dict[str, Any] | None:
    """The result of a run that already finished in `out` (printed again), else None: a DAG retry of a
    finished job changes nothing. `force` trains again."""
    result_file = out / "result.json"
    if force or not result_file.is_file():
        return None
    result = json.loads(result_file.read_text())
    emit_result(result)
    return result


# --- the LoRA policy: load it, and finish its run ---------------------------------------------

def load_policy(base_model: str, hw: Hardware, start: StartPoint, lora: Any):  # -> (model, tokenizer, LoraConfig | None)
    """(model, tokenizer, peft_config): a trainable PeftModel when continuing from an adapter (then no
    config), else the base and a fresh LoRA config from `lora` (r, alpha, dropout, target_modules)."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoTokenizer

    path = endpoints.model_path(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"  # TRL's preference trainers require it; serving and eval generate so too
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Weights load fp32 and the Trainer autocasts to bf16/fp16: the LoRA update is then accumulated in
    # fp32 (small deltas would round away in bf16; docs/performance.md). Once PEFT has frozen the base, its
    # Linear weights can be stored in bf16 (prepare_for_autocast: same numbers, no per-step casts).
    model = _base_weights(base_model, hw)
    if start.adapter_dir is not None:
        return PeftModel.from_pretrained(model, str(start.adapter_dir), is_trainable=True), tokenizer, None
    return model, tokenizer, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                        target_modules=lora.target_modules, task_type="CAUSAL_LM")


def load_base(base_model: str, hw: Hardware):  # -> transformers.PreTrainedModel
    """The bare base model, frozen, loaded as load_policy loads it (e.g. as a DPO reference)."""
    return _base_weights(base_model, hw).eval().requires_grad_(False)


def _base_weights(base_model: str, hw: Hardware):  # -> transformers.PreTrainedModel
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(endpoints.model_path(base_model), **policy_load_kwargs(hw))


def log_inputs(cfg: Any, version: str, kind: str, train, heldout, start: StartPoint, hw: Hardware,  # noqa: ANN001
               extra: dict[str, Any] | None = None) -> None:
    """Rank 0, at the start of a LoRA trainer's run: its config (plus where it started and on what) and
    the dataset splits it reads, under their shared identity."""
    log_config(cfg, {"base_model_path": str(endpoints.model_path(cfg.base_model)), "start_adapter": start.label,
                     "hardware": hw.name, "n_devices": hw.n_devices, **(extra or {})})
    log_dataset_input(version, kind, "train", train, "training")
    if heldout is not None:
        log_dataset_input(version, kind, "eval", heldout, "evaluation")


def train_and_measure(trainer: Any, out: Path, resume: str, heldout, eval_before: bool):  # noqa: ANN001, ANN201
    """Every rank: held-out metrics before (if asked) and after `train()`, which resumes from the newest
    checkpoint in out/checkpoints when `resume` is "auto". Returns (before, after, train seconds)."""
    before = trainer.evaluate() if heldout is not None and eval_before else {}
    checkpoint = last_checkpoint(out / "checkpoints") if resume == "auto" else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_s = time.perf_counter() - t0
    return before, trainer.evaluate() if heldout is not None else {}, train_s


def run_figures(trainer: Any, train_s: float, hw: Hardware) -> dict[str, float]:
    """The figures every LoRA trainer reports: the mean of the logged step losses over the whole run
    (unlike TrainOutput.training_loss it survives a resume: log_history is restored from the checkpoint),
    the last step's loss, seconds, steps, peak memory and tokens/s."""
    from training import trl_seam

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_loss": sum(losses) / max(len(losses), 1), "final_step_loss": losses[-1] if losses else float("nan"),
            "train_seconds": train_s, "train_steps": float(trainer.state.global_step),
            "peak_memory_mb": peak_memory_mb(hw.device), "tokens_per_s": trl_seam.train_tokens(trainer) / max(train_s, 1e-9)}


@dataclass(frozen=True)
class RunInfo:
    """What every LoRA trainer's result names: which job, on what, from where, on which machine."""

    trainer: str  # dpo | kto | sft
    cfg: Any  # the job's Config (base_model, register, registry_model, registry_alias)
    version: str  # the dataset version
    start: StartPoint
    hw: Hardware


def finish_run(trainer: Any, run: Any, out: Path, info: RunInfo, final: dict[str, float],
               history: list[dict[str, float]], curves: list[str]) -> dict[str, Any]:
    """Rank 0's last steps, the same for every LoRA trainer: save the adapter with its sidecar, log the
    training curves, register the adapter (alias `registry_alias`) and write result.json. The caller
    prints the result (`emit_result`) once the MLflow run has closed: MLflow prints its run links to
    stdout when a run ends, and the job's last stdout line must be the result."""
    import mlflow

    cfg = info.cfg
    adapter_dir = out / "adapter"
    trainer.model.save_pretrained(str(adapter_dir), selected_adapters=["default"])
    write_sidecar(adapter_dir, trainer=info.trainer, cfg=cfg, base_model=cfg.base_model,
                  base_model_path=endpoints.model_path(cfg.base_model), dataset_version=info.version,
                  extra={"start_adapter": info.start.label, "precision": info.hw.precision})
    plot = plot_curves(history, curves, out / f"{info.trainer}_curves.png", f"{info.trainer.upper()} {info.version}")
    if plot:
        mlflow.log_artifact(str(plot), "plots")
    result: dict[str, Any] = {"run_id": run.info.run_id, "adapter_dir": str(adapter_dir),
                              "dataset_version": info.version, "base_model": cfg.base_model,
                              "start_adapter": info.start.label, "trainer": info.trainer, "metrics": final,
                              "model_version": None, "model_uri": None}
    if cfg.register:
        ref = registry.register_adapter(adapter_dir, run.info.run_id, name=cfg.registry_model,
                                        alias=cfg.registry_alias or None,
                                        tags={"trainer": info.trainer, "dataset_version": info.version})
        result.update(model_version=ref.version, model_uri=ref.uri, model_label=ref.label)
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


# --- datasets -----------------------------------------------------------------------------------

def datasets_root() -> Path:
    return endpoints.var_dir() / "datasets"


def resolve_version(version: str) -> str:
    """`latest` -> the newest trainable version (ingest.reader); anything else must have a manifest."""
    from ingest import reader

    if version in ("", "latest"):
        latest = reader.latest_version(trainable_only=True)
        if latest is None:
            raise FileNotFoundError(f"no trainable dataset version under {datasets_root()}; build one with "
                                    f"`python -m ingest.build_dataset` or set dataset_version=<V>")
        return latest
    reader.manifest(version)  # raises, naming the known versions, when it is not there
    return version


def manifest(version: str) -> dict[str, Any]:
    from ingest import reader

    return reader.manifest(version)


def load_preferences(version: str, kind: str, split: str, behaviour: bool = False):  # -> datasets.Dataset | None
    """One kind/split of a version in TRL conversational format (via ingest.reader); None when it is empty.

    A version may hold only some kinds (the DAG picks DPO, KTO or both by what it holds): the manifest's
    counts say which, so an absent kind is None here rather than the reader's "incomplete version" error.
    """
    from ingest import reader

    counts = manifest(version).get("counts", {})
    if counts.get(kind, {}).get(split, 0) == 0:
        return None
    ds = reader.load(version, kind, split, behaviour=behaviour)
    return ds if len(ds) > 0 else None


def share_between_ranks(ds, args: Any, path: Path):  # (datasets.Dataset | None) -> the same
    """Under multi-process training, `ds` as Arrow files in `path`, written by the main process first.

    TRL caches preprocessing (the precomputed reference log-probs) next to a dataset's files; an
    in-memory dataset has none, so each rank would use a temporary folder of its own and the other
    ranks would not find rank 0's cache. From one shared folder every rank reads the same files. In one
    process the dataset is returned unchanged.
    """
    if ds is None or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ds
    from datasets import load_from_disk

    with args.main_process_first(desc=f"dataset {path.name} to disk"):
        if not (path / "state.json").is_file():
            ds.save_to_disk(str(path))
    return load_from_disk(str(path))


# --- the adapter to start from ------------------------------------------------------------------

@dataclass(frozen=True)
class StartPoint:
    """Where training starts: a registered/local adapter (continued training) or the bare base."""

    adapter_dir: Path | None
    label: str  # "base" or e.g. "flywheel-assistant/3"


def resolve_start(init_from: str, registry_model: str, base_model: str, download_dir: Path) -> StartPoint:
    """init_from: `champion` (the champion if one is registered, else base) | `base` | models:/... | a folder."""
    if init_from == "base":
        return StartPoint(None, "base")
    if Path(init_from).expanduser().is_dir():
        adapter_dir = Path(init_from).expanduser()
        label = str(adapter_dir)
    else:
        ref = registry.resolve(init_from, name=registry_model)
        if ref is None:
            if init_from == "champion":
                return StartPoint(None, "base")
            raise ValueError(f"init_from={init_from!r} names no registered adapter of {registry_model!r}; "
                             f"use init_from=champion|base or an existing models:/ URI")
        adapter_dir = registry.download(ref, download_dir)
        label = ref.label
    sidecar = registry.read_sidecar(adapter_dir)
    if sidecar.get("base_model") not in (None, base_model):
        raise ValueError(f"the start adapter {label} was trained on base_model={sidecar['base_model']!r}, not "
                         f"{base_model!r}; set base_model={sidecar['base_model']} or init_from=base")
    return StartPoint(adapter_dir, label)


# --- MLflow tracking ---------------------------------------------------------------------------

def _reopenable(run_id: str, experiment_id: str) -> bool:
    """Whether the recorded run can be re-opened: it exists on this server, is not deleted, and belongs to
    this experiment. Only "no such run" is an answer here (the id file came from another server, or the
    run was purged); any other failure (server down, HTTP 500, bad credentials) propagates, since starting
    a fresh run then would split one training run's metrics over two MLflow runs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return run.info.lifecycle_stage == "active" and run.info.experiment_id == experiment_id


def start_mlflow_run(experiment: str, run_name: str, state_dir: Path, tags: dict[str, str]):  # -> ActiveRun
    """Start (or, after a kill, re-open) the job's MLflow run; its id is kept in state_dir/mlflow_run_id."""
    import mlflow

    mlflow.set_tracking_uri(endpoints.mlflow_tracking_uri())
    exp = mlflow.set_experiment(experiment)
    id_file = state_dir / "mlflow_run_id"
    if id_file.is_file() and _reopenable(id_file.read_text().strip(), exp.experiment_id):
        return mlflow.start_run(run_id=id_file.read_text().strip())
    run = mlflow.start_run(run_name=run_name, tags=tags)
    state_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run.info.run_id)
    return run


def log_config(cfg: Any, extra: dict[str, Any] | None = None) -> None:
    """Flattened config as MLflow params (dots for nesting) plus the full config as config.json."""
    import mlflow

    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = node

    walk("", {**to_dict(cfg), **(extra or {})})
    # Params are immutable in MLflow: a resumed run re-logs the same values, which is allowed.
    try:
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
    except Exception as e:  # noqa: BLE001
        if "already" not in str(e).lower() and "INVALID_PARAMETER_VALUE" not in str(e):
            raise
    mlflow.log_dict(to_dict(cfg), "config.json")


def log_dataset_input(version: str, kind: str, split: str, ds, context: str) -> None:  # noqa: ANN001
    """Record a split of a dataset version as an MLflow input, under the identity the builder logged it
    with (ingest.reader.identity: name, digest, source), so MLflow ties the two runs to one dataset."""
    import mlflow
    import pandas as pd

    from ingest import reader

    ident = reader.identity(version, kind, split)
    preview = pd.DataFrame({"prompt_id": ds["prompt_id"][:1000]}) if "prompt_id" in ds.column_names else \
        pd.DataFrame({"rows": [len(ds)]})
    data = mlflow.data.from_pandas(preview, source=ident["source"], name=ident["name"], digest=ident["digest"])
    mlflow.log_input(data, context=context, tags={"dataset_version": version, "kind": kind, "split": split,
                                                  "rows": str(len(ds))})


class MlflowMetrics(TrainerCallback):
    """Logs every Trainer log line to the active MLflow run, plus tokens/s and peak memory; keeps a history.

    Trainer's own MLflowCallback opens its own run and logs every TrainingArguments field; this one logs
    into the job's run only what the job names, with the Trainer's global step as the MLflow step.
    """

    def __init__(self, device: str, prefix: str = "") -> None:
        self.device = device
        self.prefix = prefix
        self.history: list[dict[str, float]] = []
        self._t0: float | None = None
        self._tokens0 = 0.0

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._t0 = time.perf_counter()
        self._tokens0 = float(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
        import mlflow

        if not logs:
            return
        row = {k.replace("/", "_"): float(v) for k, v in logs.items() if isinstance(v, int | float)}
        if self._t0 is not None and "num_tokens" in row:
            elapsed = time.perf_counter() - self._t0
            row["tokens_per_s"] = (row["num_tokens"] - self._tokens0) / max(elapsed, 1e-9)
        row["peak_memory_mb"] = peak_memory_mb(self.device)
        row["step"] = float(state.global_step)
        self.history.append(row)
        if mlflow.active_run() is not None:
            mlflow.log_metrics({self.prefix + k: v for k, v in row.items() if k != "step"}, step=state.global_step)


def plot_curves(history: list[dict[str, float]], keys: list[str], path: Path, title: str) -> Path | None:
    """One PNG with a panel per metric (x = step); metrics missing from the history are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [k for k in keys if any(k in h for h in history)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present, strict=True):
        pts = [(h["step"], h[key]) for h in history if key in h]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
