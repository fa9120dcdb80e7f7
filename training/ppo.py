"""PPO on a LoRA policy against a reward model, on torch + transformers + peft (TRL removed PPOTrainer).

    python -m training.ppo --config training/configs/ppo.yaml dataset_version=<V> [key=value ...]

One frozen base model serves three roles: the policy is base + LoRA adapter, the
reference is the same base with the adapter disabled, and the value head is a linear layer on the
policy's last hidden state. Each iteration: sample answers to a batch of prompts, score them with the
reward model, shape per-token rewards (score - beta * KL to the reference, beta adapted to a KL
target), compute GAE advantages, then run clipped policy + value updates over minibatches for a few
epochs. The maths is in training/ppo_math.py. Prompts come from the dataset version (its unique
train prompts). Reward, KL and value-loss curves go to MLflow; the adapter is registered as
`challenger` like a DPO adapter. The last stdout line is the result JSON.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ingest import endpoints
from ingest.config import parse_config
from training import common, ppo_math, registry
from training.dpo import LoraSettings


@dataclass
class Config:
    """PPO of a LoRA adapter against a reward model.

    Data:          dataset_version (prompts = the version's unique train prompts), max_prompts (0 = all)
    Model:         base_model, init_from (base | champion | models:/... | folder: the adapter to start from;
                   the reference is always the adapter-disabled base), lora.{r, alpha, dropout, target_modules}
    Reward:        reward_model (models:/flywheel-reward@champion | a flywheel-reward version number or alias |
                   a folder | rule:bullets | rule:short | rule:keyword=WORD), reward_scale
    Rollouts:      iterations, rollout_batch (prompts per iteration), max_new_tokens, temperature
    PPO:           ppo_epochs, minibatch_size, learning_rate, gamma, lam, clip_range, value_clip, vf_coef,
                   max_grad_norm, whiten_advantages
    KL:            init_kl_coef, adaptive_kl, kl_target (nats/answer), kl_horizon, kl_budget (reported: the
                   run fails its `kl_within_budget` check when the final KL exceeds it)
    Run:           seed, precision (auto | bf16 | fp32), threads (CPU threads, 0 = default), output_dir, force
                   (train again although output_dir holds a finished run), experiment, run_name, registry_model,
                   registry_alias, register
    """

    dataset_version: str = "latest"
    max_prompts: int = 0
    base_model: str = "tiny"
    init_from: str = "base"
    lora: LoraSettings = field(default_factory=LoraSettings)
    reward_model: str = "models:/flywheel-reward@champion"
    reward_scale: float = 1.0
    iterations: int = 20
    rollout_batch: int = 16
    max_new_tokens: int = 48
    temperature: float = 1.0
    ppo_epochs: int = 2
    minibatch_size: int = 8
    learning_rate: float = 1e-4
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.1
    max_grad_norm: float = 1.0
    whiten_advantages: bool = True
    init_kl_coef: float = 0.05
    adaptive_kl: bool = True
    kl_target: float = 2.0
    kl_horizon: int = 1000
    kl_budget: float = 6.0
    seed: int = 0
    precision: str = "fp32"
    threads: int = 0
    output_dir: str = ""
    force: bool = False
    experiment: str = "flywheel-training"
    run_name: str = ""
    registry_model: str = registry.DEFAULT_MODEL_NAME
    registry_alias: str = "candidate"
    register: bool = True


# --- rewards --------------------------------------------------------------------------------------------

Scorer = Callable[[list[list[dict[str, str]]], list[str]], list[float]]


def rule_scorer(spec: str) -> Scorer:
    """Hand-written reward functions for tests and demos; the production reward is a trained reward model.

    rule:bullets        1 if the answer contains a bullet list line ("- "), else 0
    rule:short          -(words / 20): shorter is better
    rule:keyword=WORD   1 if WORD occurs in the answer (case-insensitive), else 0
    """
    name, _, arg = spec.removeprefix("rule:").partition("=")
    if name == "bullets":
        return lambda prompts, answers: [float(bool(re.search(r"(^|\n)- ", a))) for a in answers]
    if name == "short":
        return lambda prompts, answers: [-len(a.split()) / 20.0 for a in answers]
    if name == "keyword" and arg:
        return lambda prompts, answers: [float(arg.lower() in a.lower()) for a in answers]
    raise ValueError(f"reward={spec!r}: unknown rule; use rule:bullets, rule:short or rule:keyword=WORD")


def reward_model_version(spec: str) -> str | None:
    """The registry version behind a reward spec (aliases move; evaluation must know which one PPO used)."""
    if spec.startswith("rule:") or Path(spec).expanduser().is_dir():
        return None
    from training.reward_model import REWARD_MODEL_NAME

    ref = registry.resolve(spec, name=REWARD_MODEL_NAME)
    return ref.version if ref is not None else None


def load_reward(spec: str) -> Scorer:
    if spec.startswith("rule:"):
        return rule_scorer(spec)
    from training.reward_model import load_scorer

    return load_scorer(spec)


# --- model pieces -----------------------------------------------------------------------------------------

class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state; zero-initialised so early values are 0, not noise."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


def forward_response(model, value_head: ValueHead | None, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # noqa: ANN001
                     prompt_width: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens (and values of the states before them), [B, T_response]."""
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=value_head is not None, use_cache=False)
    logits = out.logits[:, prompt_width - 1:-1].float() / temperature
    targets = input_ids[:, prompt_width:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    values = value_head(out.hidden_states[-1][:, prompt_width - 1:-1]) if value_head is not None else None
    return logprobs, values


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first end-of-turn token, 0 after it (generate pads with eos = pad)."""
    is_eos = (response == eos_id).int()
    after_first = (is_eos.cumsum(dim=1) - is_eos) > 0
    return (~after_first).float()


def prompts_of(version: str, max_prompts: int, seed: int) -> list[list[dict[str, str]]]:
    """The version's unique train prompts (from whichever kinds it holds), in a seeded order."""
    seen: dict[str, list[dict[str, str]]] = {}
    for kind in ("dpo", "kto", "sft"):
        ds = common.load_preferences(version, kind, "train")
        if ds is not None:
            for prompt in ds["prompt"]:
                seen.setdefault(json.dumps(prompt, sort_keys=True), prompt)
    if not seen:
        raise ValueError(f"dataset {version} holds no train prompts for PPO")
    prompts = [seen[k] for k in sorted(seen)]
    random.Random(seed).shuffle(prompts)
    return prompts[:max_prompts] if max_prompts > 0 else prompts


# --- the steps of one iteration: rollout, score, update -------------------------------------------------

@dataclass
class Rollout:
    """One batch of sampled answers: the token sequences, their masks and the reward model's scores."""

    seqs: torch.Tensor  # [B, prompt + response]
    attn: torch.Tensor  # attention mask over seqs
    mask: torch.Tensor  # [B, response]: 1 up to and including the first eos
    prompt_width: int
    scores: torch.Tensor  # [B]


@dataclass
class Scored:
    """What the update needs: the old log-probs and values, advantages, returns, and the per-token KL."""

    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


def rollout(policy, tokenizer, scorer: Scorer, prompts: list, cfg: Config, autocast) -> Rollout:  # noqa: ANN001
    """Sample one answer per prompt with the current policy and score it."""
    device = next(policy.parameters()).device
    enc = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, return_tensors="pt", padding=True,
                                        return_dict=True).to(device)
    width = enc["input_ids"].shape[1]
    policy.eval()
    with torch.no_grad(), autocast():
        seqs = policy.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                               max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    response = seqs[:, width:]
    mask = response_mask(response, tokenizer.eos_token_id)
    attn = torch.cat([enc["attention_mask"], mask.long()], dim=1)
    answers = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, mask, strict=True)]
    scores = torch.tensor(scorer(prompts, answers), dtype=torch.float32, device=device) * cfg.reward_scale
    return Rollout(seqs, attn, mask, width, scores)


def score(policy, value_head: ValueHead, ro: Rollout, cfg: Config, kl_beta: float, autocast) -> Scored:  # noqa: ANN001
    """Old log-probs and values, the reference's log-probs (same weights, adapter disabled), the
    KL-shaped rewards and their GAE advantages."""
    with torch.no_grad(), autocast():
        old_logp, old_values = forward_response(policy, value_head, ro.seqs, ro.attn, ro.prompt_width, cfg.temperature)
        with policy.disable_adapter():
            ref_logp, _ = forward_response(policy, None, ro.seqs, ro.attn, ro.prompt_width, cfg.temperature)
    old_logp, old_values, ref_logp = (t.float() * ro.mask for t in (old_logp, old_values, ref_logp))
    rewards, kl = ppo_math.shaped_rewards(ro.scores, old_logp, ref_logp, ro.mask, kl_beta)
    advantages, returns = ppo_math.gae(rewards, old_values, ro.mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = ppo_math.whiten(advantages, ro.mask)
    return Scored(old_logp, old_values, advantages, returns, kl)


def update(policy, value_head: ValueHead, optimizer: torch.optim.Optimizer, ro: Rollout, sc: Scored,  # noqa: ANN001
           cfg: Config, autocast) -> dict[str, float]:  # noqa: ANN001
    """PPO epochs over shuffled minibatches (clipped policy and value losses); mean of each statistic."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    policy.train()
    stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "approx_kl": [],
                                     "vf_clipfrac": []}
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(ro.seqs.size(0), device=ro.seqs.device).split(cfg.minibatch_size):
            with autocast():
                logp, values = forward_response(policy, value_head, ro.seqs[mb], ro.attn[mb], ro.prompt_width,
                                                cfg.temperature)
            pl, pstats = ppo_math.policy_loss(logp.float(), sc.old_logp[mb], sc.advantages[mb], ro.mask[mb],
                                              cfg.clip_range)
            vl, vstats = ppo_math.value_loss(values.float(), sc.old_values[mb], sc.returns[mb], ro.mask[mb],
                                             cfg.value_clip)
            optimizer.zero_grad(set_to_none=True)
            (pl + cfg.vf_coef * vl).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            for k, v in {"policy_loss": pl, "value_loss": vl, **pstats, **vstats}.items():
                stats[k].append(float(v.detach()))
    return {k: sum(v) / max(len(v), 1) for k, v in stats.items()}


# --- the job ----------------------------------------------------------------------------------------------

def load_policy(cfg: Config, start: common.StartPoint, device: torch.device):  # -> (policy, value_head, tokenizer)
    """Base + LoRA (continued from `start`, or fresh) and a value head on the base's hidden states."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = endpoints.model_path(cfg.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if start.adapter_dir is not None:
        policy = PeftModel.from_pretrained(base, str(start.adapter_dir), is_trainable=True)
    else:
        policy = get_peft_model(base, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM"))
    return policy.to(device), ValueHead(base.config.hidden_size).to(device), tokenizer


def iteration_record(it: int, ro: Rollout, sc: Scored, stats: dict[str, float], beta: float, seconds: float,
                     cfg: Config, hw: common.Hardware) -> dict[str, float]:
    """One row of the run's history (and its MLflow metrics at step it + 1)."""
    return {"step": float(it + 1), "reward_mean": float(ro.scores.mean()), "reward_std": float(ro.scores.std()),
            "kl": float(sc.kl.sum(dim=1).mean()), "kl_coef": beta, "response_tokens": float(ro.mask.sum(dim=1).mean()),
            "non_score_reward": float((-beta * sc.kl).sum(dim=1).mean()),
            "tokens": float(ro.attn.sum()), "tokens_per_s": float(ro.attn.sum()) * (1 + cfg.ppo_epochs) / max(seconds, 1e-9),
            "peak_memory_mb": common.peak_memory_mb(hw.device), **stats}


def summary(history: list[dict[str, float]], cfg: Config, final_beta: float, seconds: float,
            hw: common.Hardware) -> dict[str, float]:
    """Means over the first and last quarter of the iterations (single batches are noisy), KL, time."""
    q = max(1, cfg.iterations // 4)
    first, last = history[:q], history[-q:]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(h[key] for h in rows) / len(rows)

    final = {"reward_first": mean(first, "reward_mean"), "reward_last": mean(last, "reward_mean"),
             "kl_last": mean(last, "kl"), "kl_max": max(h["kl"] for h in history),
             "value_loss_last": mean(last, "value_loss"), "kl_coef_final": final_beta, "train_seconds": seconds,
             "tokens_total": sum(h["tokens"] for h in history), "peak_memory_mb": common.peak_memory_mb(hw.device)}
    final["kl_within_budget"] = float(final["kl_last"] <= cfg.kl_budget)
    return final


def finish(policy, value_head: ValueHead, run, out: Path, cfg: Config, version: str, start: common.StartPoint,  # noqa: ANN001
           history: list[dict[str, float]], final: dict[str, float]) -> dict[str, Any]:
    """Curves, adapter + sidecar (with the reward model's version: evaluation must not judge with it),
    registration and result.json."""
    import mlflow

    (out / "history.json").write_text(json.dumps(history, indent=1))
    plot = common.plot_curves(history, ["reward_mean", "kl", "kl_coef", "value_loss", "policy_loss"],
                              out / "ppo_curves.png", f"PPO {version} ({cfg.reward_model})")
    if plot:
        mlflow.log_artifact(str(plot), "plots")
    adapter_dir = out / "adapter"
    policy.save_pretrained(str(adapter_dir))
    torch.save(value_head.state_dict(), out / "value_head.pt")  # not part of the served adapter
    common.write_sidecar(adapter_dir, trainer="ppo", cfg=cfg, base_model=cfg.base_model,
                         base_model_path=endpoints.model_path(cfg.base_model), dataset_version=version,
                         extra={"start_adapter": start.label, "reward_model": cfg.reward_model,
                                "reward_model_version": reward_model_version(cfg.reward_model)})
    result: dict[str, Any] = {"run_id": run.info.run_id, "adapter_dir": str(adapter_dir), "dataset_version": version,
                              "base_model": cfg.base_model, "start_adapter": start.label, "trainer": "ppo",
                              "metrics": final, "model_version": None, "model_uri": None}
    if cfg.register:
        ref = registry.register_adapter(adapter_dir, run.info.run_id, name=cfg.registry_model,
                                        alias=cfg.registry_alias or None, tags={"trainer": "ppo", "dataset_version": version})
        result.update(model_version=ref.version, model_uri=ref.uri, model_label=ref.label)
    (out / "result.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str))
    return result


def main(cfg: Config) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    version = common.resolve_version(cfg.dataset_version)
    out = Path(cfg.output_dir) if cfg.output_dir else common.default_output_dir("ppo", version, cfg)
    out.mkdir(parents=True, exist_ok=True)
    if (done := common.finished_result(out, cfg.force)) is not None:
        return done  # a DAG retry of a finished run changes nothing
    common.set_threads(cfg.threads)
    hw = common.detect_hardware(cfg.precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(hw.precision)
    device = torch.device("cuda" if hw.device == "cuda" else "cpu")

    def autocast():  # noqa: ANN202
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    prompts = prompts_of(version, cfg.max_prompts, cfg.seed)
    scorer = load_reward(cfg.reward_model)
    start = common.resolve_start(cfg.init_from, cfg.registry_model, cfg.base_model, out / "start")
    policy, value_head, tokenizer = load_policy(cfg, start, device)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-6)
    kl_ctl = ppo_math.AdaptiveKLController(cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon)
    tags = {"trainer": "ppo", "dataset_version": version, "base_model": cfg.base_model, "reward": cfg.reward_model,
            "start": start.label, **hw.tags()}
    with common.start_mlflow_run(cfg.experiment, cfg.run_name or f"ppo-{version}", out, tags) as run:
        import mlflow

        common.log_config(cfg, {"hardware": hw.name, "n_prompts": len(prompts)})
        history: list[dict[str, float]] = []
        t_start = time.perf_counter()
        for it in tqdm(range(cfg.iterations), desc="PPO iterations"):
            t0 = time.perf_counter()
            batch = [prompts[(it * cfg.rollout_batch + i) % len(prompts)] for i in range(cfg.rollout_batch)]
            ro = rollout(policy, tokenizer, scorer, batch, cfg, autocast)
            sc = score(policy, value_head, ro, cfg, kl_ctl.beta, autocast)
            stats = update(policy, value_head, optimizer, ro, sc, cfg, autocast)
            history.append(iteration_record(it, ro, sc, stats, kl_ctl.beta, time.perf_counter() - t0, cfg, hw))
            if cfg.adaptive_kl:
                kl_ctl.update(history[-1]["kl"], cfg.rollout_batch)
            mlflow.log_metrics({k: v for k, v in history[-1].items() if k != "step"}, step=it + 1)
        final = summary(history, cfg, kl_ctl.beta, time.perf_counter() - t_start, hw)
        mlflow.log_metrics(final, step=cfg.iterations)
        result = finish(policy, value_head, run, out, cfg, version, start, history, final)
    common.emit_result(result)  # after the run closed (MLflow prints its links when a run ends)
    return result


if __name__ == "__main__":
    main(parse_config(Config))
