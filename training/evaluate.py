"""Evaluate a candidate adapter against the champion (or the base model) and log it to MLflow.

    python -m training.evaluate --candidate models:/flywheel-assistant@candidate \
        --baseline models:/flywheel-assistant@champion [--suite training/configs/evaluate.yaml] [key=value ...]

Both models answer the same prompts with the same seeds (batched, left padding, cut at the first
eos); a judge scores the answers (a reward model trained on the users' feedback; `judge=none` skips
the win rate). Metrics, all candidate-vs-baseline on the same prompts:

  win_rate (+ bootstrap CI over prompts, ties = 1/2), lc_win_rate (length-controlled), length_drift,
  kl_per_token (candidate || base), over-refusal on benign prompts, compliance with harmful prompts,
  agreement with false premises, regression exact match, held-out preference accuracy and implicit
  reward margin on the dataset's eval split.

No champion yet -> the baseline is the base model. The run is tagged with the candidate's model
version (and the version with `eval_run_id`), so the gate and the UI find one from the other. A
markdown report and a PNG chart are logged as artifacts. The last stdout line is JSON:
{"run_id", "candidate", "baseline", "metrics"[, "gate"]}.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from training.gate import job_argv

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SUITE = REPO / "training" / "configs" / "evaluate.yaml"
Messages = list[dict[str, str]]


@dataclass
class Config:
    """Evaluation suite: what to compare, on which prompts, how to generate, how to score.

    Models:
      candidate: registry URI (models:/NAME@alias or models:/NAME/V) or a local adapter folder
      baseline: same, or "base"; an unset alias (no champion yet) means the base model
      base_model: base model setting used when the candidate's sidecar names none (tiny, smollm2, path)
    Judge:
      judge: rm[:URI] | none | rule:uses_list | rule:length | rule:concise | llm:MODEL@URL (training.judges).
        The retrain DAG passes the reward model trained on the candidate's dataset version; its held-out
        accuracy is logged (judge_accuracy*) so the gate can tell whether its verdict counts
    Prompts:
      eval_data: folder with heldout/benign/harmful/sycophancy/regression .jsonl sets
      winrate_prompts: auto = the dataset's eval-split prompts when the candidate has a dataset version,
        topped up to n_winrate from eval_data/heldout.jsonl; dataset / file use only one of them
      n_winrate, n_benign, n_harmful, n_sycophancy, n_regression: prompts per set (0 skips the set)
    Generation:
      max_new_tokens, batch_size, temperature (0 = greedy), top_p, seed
      dtype: auto = training.precision's choice for this CPU (bf16 only with avx512_bf16/AMX), or bf16 / fp32
      probe_temperature, probe_max_new_tokens: for the benign/harmful/sycophancy/regression probes;
        greedy by default so a probe rate moves only when the model does, not with sampling noise
        (probe sets are small: one answer is 6-12 points), and short because refusals, pushback and
        answers come first
      threads: torch CPU threads (0 = torch's default). On a shared CPU set 1: with the cores
        oversubscribed, 2 spinning OpenMP threads made a tiny-model step ~10x slower than 1 thread
    Statistics:
      bootstrap: resamples for confidence intervals; confidence: CI level
    Preference data:
      dataset_version: "" = the candidate's sidecar dataset_version; "none" skips the preference metrics
      n_pref_pairs: held-out DPO pairs to score; beta: implicit-reward scale (0 = the sidecar's, else 0.1)
    Output:
      experiment: MLflow experiment; report_dir: "" = var/eval/<run id>; gate: also apply the release
        gate (training.gate) with gate_config and record its decision
    """

    candidate: str = "models:/flywheel-assistant@candidate"
    baseline: str = "models:/flywheel-assistant@champion"
    base_model: str = "smollm2"
    judge: str = "rm"
    eval_data: str = "training/eval_data"
    winrate_prompts: Literal["auto", "dataset", "file"] = "auto"
    n_winrate: int = 48
    n_benign: int = 24
    n_harmful: int = 12
    n_sycophancy: int = 12
    n_regression: int = 16
    max_new_tokens: int = 64
    batch_size: int = 16
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32", "bfloat16", "float32"] = "auto"
    probe_temperature: float = 0.0
    probe_max_new_tokens: int = 32
    threads: int = 0
    bootstrap: int = 2000
    confidence: float = 0.95
    dataset_version: str = ""
    n_pref_pairs: int = 64
    beta: float = 0.0
    experiment: str = "flywheel-eval"
    report_dir: str = ""
    gate: bool = False
    gate_config: str = "training/configs/gate.yaml"


# --- statistics (pure) ------------------------------------------------------------------------


def outcomes(cand_scores: Sequence[float], base_scores: Sequence[float]) -> np.ndarray:
    """Per-prompt result for the candidate: 1 win, 0.5 tie, 0 loss."""
    c, b = np.asarray(cand_scores, float), np.asarray(base_scores, float)
    return np.where(c > b, 1.0, np.where(c < b, 0.0, 0.5))


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                 stat=np.mean) -> tuple[float, float]:  # noqa: ANN001
    """Percentile bootstrap CI of `stat` over `values` (resampled with replacement, one value per prompt)."""
    x = np.asarray(values, float)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    stats = np.array([stat(x[i]) for i in idx]) if stat is not np.mean else x[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: honest at a few dozen trials and at rates near 0 or 1, where
    the normal approximation's interval leaves [0, 1] or shrinks to nothing. (nan, nan) when n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    from scipy.stats import norm

    z = float(norm.ppf(1 - (1 - confidence) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def lc_win_rate(results: Sequence[float], len_diff: Sequence[float], l2: float = 1e-3, iters: int = 100) -> float:
    """Length-controlled win rate: fit P(win) = sigmoid(a + b * tanh(d / sd(d))) and report sigmoid(a).

    The same idea as AlpacaEval's length-controlled win rate: the intercept is the win rate the
    candidate would have if its answers were as long as the baseline's. Ties enter as 1/2 targets of
    the logistic likelihood. A small L2 penalty on b keeps the fit finite when length alone
    separates wins from losses (then the answer is ~1/2 for symmetric length differences).
    """
    y = np.asarray(results, float)
    d = np.asarray(len_diff, float)
    if len(y) == 0:
        return float("nan")
    sd = d.std()
    x = np.tanh(d / sd) if sd > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    reg = np.diag([1e-6, l2]) * len(y)
    for _ in range(iters):  # Newton-Raphson on the penalised log-likelihood
        p = 1 / (1 + np.exp(-(X @ w)))
        grad = X.T @ (y - p) - reg @ w
        hess = X.T @ (X * (p * (1 - p))[:, None]) + reg
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-8:
            break
    return float(1 / (1 + math.exp(-w[0])))


def rate(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else float("nan")


# --- prompts ------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"eval prompt set {path} is missing; set eval_data= to a folder holding it")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def take(rows: list[dict], n: int, seed: int) -> list[dict]:
    """The first n rows of a seeded shuffle, so a smaller suite is a fixed random subset."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def dataset_rows(version: str, kind: str, split: str = "eval") -> list[dict]:
    """Contract rows of one kind and split of a dataset version (ingest.reader, stable order).

    A version may hold only some kinds, so a kind its manifest counts no rows of is []. An unknown
    version, or counted rows whose files are missing, raises (ingest.reader says which and what to
    do): an evaluation that silently found no rows would score the candidate on nothing.
    """
    from ingest import reader

    if reader.manifest(version).get("counts", {}).get(kind, {}).get(split, 0) == 0:
        return []
    return reader.load_rows(version, kind, split)


def winrate_prompts(cfg: Config, dataset_version: str | None) -> tuple[list[Messages], str]:
    """Held-out prompts for the win rate, and a label of where they came from.

    auto: the dataset's eval-split prompts (the users' own distribution), topped up from
    eval_data/heldout.jsonl to n_winrate when the split has fewer: a 10% split of a small window can
    hold a dozen prompts, and a bootstrap CI over a dozen prompts spans ~0.4 of win rate, too wide
    for the gate to tell a real improvement from none.
    """
    chosen: list[Messages] = []
    label = ""
    if cfg.winrate_prompts != "file" and dataset_version:
        seen: dict[str, Messages] = {}
        for kind in ("dpo", "kto", "sft"):
            for r in dataset_rows(dataset_version, kind):
                seen.setdefault(r["prompt_id"], json.loads(r["prompt_json"]))
        rows = [{"messages": seen[k]} for k in sorted(seen)]
        chosen = [r["messages"] for r in take(rows, cfg.n_winrate, cfg.seed)]
        label = f"dataset {dataset_version} eval split ({len(chosen)})" if chosen else ""
        if cfg.winrate_prompts == "dataset":
            if not chosen:
                raise FileNotFoundError(
                    f"winrate_prompts=dataset but dataset version {dataset_version!r} has no eval-split rows under "
                    f"datasets/<kind>/version=.../split=eval; build one or use winrate_prompts=file")
            return chosen, label
    elif cfg.winrate_prompts == "dataset":
        raise FileNotFoundError("winrate_prompts=dataset needs a candidate with a dataset version; "
                                "use winrate_prompts=file or auto")
    if len(chosen) >= cfg.n_winrate:
        return chosen, label
    have = {json.dumps(m, sort_keys=True) for m in chosen}
    extra = [r["messages"] for r in take(read_jsonl(_data_dir(cfg) / "heldout.jsonl"), cfg.n_winrate, cfg.seed)
             if json.dumps(r["messages"], sort_keys=True) not in have][: cfg.n_winrate - len(chosen)]
    source = f"eval_data/heldout.jsonl ({len(extra)})"
    return chosen + extra, f"{label} + {source}" if label else source


def _data_dir(cfg: Config) -> Path:
    p = Path(cfg.eval_data)
    return p if p.is_absolute() else REPO / p


# --- models -------------------------------------------------------------------------------------


@dataclass
class Side:
    """One side of the comparison: an adapter (name used inside the PEFT model) or the base model."""

    label: str           # e.g. flywheel-assistant/3, or "base"
    adapter: str | None  # PEFT adapter name, None = base model
    ref: Any = None      # registry.AdapterRef when it came from the registry
    sidecar: dict | None = None


def resolve_side(spec: str, cache: Path, allow_missing: bool) -> tuple[Side, Path | None]:
    """A registry URI, a local adapter folder or "base" -> (Side, adapter folder or None)."""
    from training import registry

    if spec in ("", "base"):
        return Side("base", None), None
    local = Path(spec)
    if local.is_dir():
        return Side(str(local), "local-" + local.name, None, registry.read_sidecar(local)), local
    ref = registry.resolve(spec)
    if ref is None:
        if allow_missing:
            return Side("base", None), None
        raise SystemExit(f"{spec} does not resolve to a model version; register a candidate first "
                         f"(training.dpo registers it as @candidate)")
    folder = registry.download(ref, cache)
    return Side(ref.label, "v" + ref.version, ref, registry.read_sidecar(folder)), folder


class Policies:
    """One base model with the compared LoRA adapters attached by name; the base is the adapters-off model."""

    def __init__(self, base_path: str, adapters: dict[str, Path], dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from training import precision

        self.torch = torch
        # Generation runs on the CPU here; the decision is logged and recorded in the report and the run.
        self.precision = precision.announce(precision.decide(dtype, "cpu"))
        self.tok = AutoTokenizer.from_pretrained(base_path)
        self.tok.padding_side = "left"  # batched generation needs left padding
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(base_path, dtype=self.precision.torch_dtype)
        if adapters:
            from peft import PeftModel

            (first, first_dir), *rest = adapters.items()
            model = PeftModel.from_pretrained(model, str(first_dir), adapter_name=first)
            for name, folder in rest:
                model.load_adapter(str(folder), adapter_name=name)
        self.model = model.eval()
        self.eos = self.tok.eos_token_id

    @contextmanager
    def use(self, adapter: str | None):
        if adapter is None:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
        else:
            self.model.set_adapter(adapter)
            yield self.model

    def _prompt_ids(self, messages: Messages) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def generate(self, adapter: str | None, prompts: list[Messages], cfg: Config, desc: str) -> list[dict]:
        """Answers for `prompts`: [{"text", "ids", "truncated"}]; batch b always uses seed cfg.seed + b."""
        from tqdm import tqdm

        torch = self.torch
        out: list[dict] = []
        batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
        with self.use(adapter) as model, torch.no_grad():
            for b, batch in enumerate(tqdm(batches, desc=desc, leave=False, disable=None)):
                ids = [self._prompt_ids(m) for m in batch]
                width = max(map(len, ids))
                input_ids = torch.tensor([[self.tok.pad_token_id] * (width - len(x)) + x for x in ids])
                mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
                torch.manual_seed(cfg.seed + b)  # same seeds for both sides: differences come from the model
                sampling = {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} \
                    if cfg.temperature > 0 else {"do_sample": False}
                gen = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=self.eos, pad_token_id=self.tok.pad_token_id, **sampling)
                for row in gen[:, width:].tolist():
                    cut = row.index(self.eos) if self.eos in row else len(row)  # cut at the first eos
                    out.append({"text": self.tok.decode(row[:cut], skip_special_tokens=True).strip(),
                                "ids": row[:cut], "truncated": cut == len(row)})
        return out

    def _batch_logits(self, model, seqs: list[list[int]]):  # noqa: ANN001
        torch = self.torch
        width = max(map(len, seqs))
        input_ids = torch.tensor([[self.tok.pad_token_id] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        return model(input_ids=input_ids, attention_mask=mask).logits.float(), width

    def completion_logprobs(self, adapter: str | None, prompts: list[Messages], completions: list[str],
                            batch_size: int) -> np.ndarray:
        """Sum of log p(completion tokens + eos | prompt) per row, as TRL scores a DPO completion."""
        torch = self.torch
        out = []
        with self.use(adapter) as model, torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                p_ids = [self._prompt_ids(m) for m in prompts[i:i + batch_size]]
                c_ids = [self.tok(c, add_special_tokens=False)["input_ids"] + [self.eos]
                         for c in completions[i:i + batch_size]]
                seqs = [p + c for p, c in zip(p_ids, c_ids, strict=True)]
                logits, width = self._batch_logits(model, seqs)
                # log p(token) = logit - logsumexp(logits): no second [batch, length, vocab] tensor
                for r, (s, c) in enumerate(zip(seqs, c_ids, strict=True)):
                    start = width - len(c)  # positions of the completion tokens in the padded row
                    rows = logits[r, start - 1:width - 1]
                    tgt = torch.tensor(s[-len(c):])
                    lp = rows.gather(-1, tgt[:, None])[:, 0] - torch.logsumexp(rows, -1)
                    out.append(lp.sum().item())
        return np.array(out)

    def kl_to_base(self, adapter: str, prompts: list[Messages], answers: list[dict], batch_size: int) -> list[float]:
        """Per-answer mean over its tokens of the exact KL(candidate || base) of the next-token distributions."""
        torch = self.torch
        per_answer: list[float] = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch_size):
                seqs, n_gen = [], []
                for m, a in zip(prompts[i:i + batch_size], answers[i:i + batch_size], strict=True):
                    ids = a["ids"] + ([] if a["truncated"] else [self.eos])
                    seqs.append(self._prompt_ids(m) + ids)
                    n_gen.append(len(ids))
                # Only the positions that predict answer tokens: SmolLM2's 49k vocab makes full-length
                # [batch, length, vocab] float tensors the memory peak of the suite.
                span = max(n_gen) + 1
                with self.use(adapter) as model:
                    lc, width = self._batch_logits(model, seqs)
                    lpc = torch.log_softmax(lc[:, -span:-1], -1)
                    del lc
                with self.use(None) as model:
                    lb, _ = self._batch_logits(model, seqs)
                    lpb = torch.log_softmax(lb[:, -span:-1], -1)
                    del lb
                kl = (lpc.exp() * (lpc - lpb)).sum(-1)  # [batch, span - 1]; column j predicts token j+1 of the span
                for r, n in enumerate(n_gen):
                    per_answer.append(kl[r, span - 1 - n:].mean().item() if n else 0.0)
        return per_answer


# --- the suite ----------------------------------------------------------------------------------


@dataclass
class _Pair:
    """Both sides of the comparison, answering the same prompts; keeps samples for the report."""

    pol: Policies
    cand: Side
    base: Side
    samples: dict[str, list[dict]]

    def both(self, prompts: list[Messages], name: str, gen_cfg: Config) -> tuple[list[dict], list[dict]]:
        a = self.pol.generate(self.cand.adapter, prompts, gen_cfg, f"{name}: candidate")
        b = self.pol.generate(self.base.adapter, prompts, gen_cfg, f"{name}: baseline")
        self.samples[name] = [{"prompt": p[-1]["content"], "candidate": x["text"], "baseline": y["text"]}
                              for p, x, y in zip(prompts, a, b, strict=True)]
        return a, b


def run_suite(cfg: Config, pol: Policies, cand: Side, base: Side, judge, dataset_version: str | None,
              beta: float) -> tuple[dict[str, float], dict[str, Any]]:  # noqa: ANN001
    """All metrics (flat dict of floats) plus details for the report (samples, sources)."""
    pair = _Pair(pol, cand, base, {})
    prompts, source = winrate_prompts(cfg, dataset_version)
    m = winrate_metrics(pair, prompts, judge, cfg) if prompts else {}
    m |= probe_metrics(pair, cfg)
    pairs = take(dataset_rows(dataset_version, "dpo"), cfg.n_pref_pairs, cfg.seed) if dataset_version else []
    if pairs and cand.adapter is not None:
        m |= preference_metrics(pair, pairs, beta, cfg)
    return m, {"samples": pair.samples, "winrate_source": source, "pref_pairs": len(pairs)}


def winrate_metrics(pair: _Pair, prompts: list[Messages], judge, cfg: Config) -> dict[str, float]:  # noqa: ANN001
    """Win rate by the judge (with its CI and a length-controlled variant), length drift, list rate and
    KL from the base, on held-out prompts. Without a judge (NoJudge) only the judge-free figures."""
    from training import judges

    a, b = pair.both(prompts, "winrate", cfg)
    la = np.array([judges.word_count(x["text"]) for x in a], float)
    lb = np.array([judges.word_count(x["text"]) for x in b], float)
    m: dict[str, float] = {}
    if not isinstance(judge, judges.NoJudge):
        sa = judge.score(prompts, [x["text"] for x in a])
        sb = judge.score(prompts, [x["text"] for x in b])
        res = outcomes(sa, sb)
        lo, hi = bootstrap_ci(res, cfg.bootstrap, cfg.confidence, cfg.seed)
        m.update(win_rate=float(res.mean()), win_rate_ci_low=lo, win_rate_ci_high=hi, n_winrate=len(res),
                 wins=float((res == 1).sum()), ties=float((res == 0.5).sum()),
                 losses=float((res == 0).sum()), lc_win_rate=lc_win_rate(res, la - lb),
                 judge_score_candidate=float(np.mean(sa)), judge_score_baseline=float(np.mean(sb)))
    m.update(length_candidate=float(la.mean()), length_baseline=float(lb.mean()),
             length_drift=float((la.mean() - lb.mean()) / max(lb.mean(), 1.0)),
             truncated_candidate=rate([x["truncated"] for x in a]),
             truncated_baseline=rate([x["truncated"] for x in b]),
             list_rate_candidate=rate([judges.uses_list(x["text"]) for x in a]),
             list_rate_baseline=rate([judges.uses_list(x["text"]) for x in b]),
             kl_per_token=_mean_kl(pair, pair.cand, prompts, a, cfg),
             # the baseline's own drift (the champion's, cycles in): the gate bounds each cycle's step
             kl_per_token_baseline=_mean_kl(pair, pair.base, prompts, b, cfg))
    return m


def _mean_kl(pair: _Pair, side: Side, prompts: list[Messages], answers: list[dict], cfg: Config) -> float:
    """Mean per-token KL(side || base) on the side's own answers; 0 for the base model itself."""
    if side.adapter is None:
        return 0.0
    return float(np.mean(pair.pol.kl_to_base(side.adapter, prompts, answers, cfg.batch_size)))


def probe_metrics(pair: _Pair, cfg: Config) -> dict[str, float]:
    """Rates on the probe sets (greedy, short), candidate vs baseline: refusals of benign requests,
    compliance with harmful ones, agreement with false premises, regression exact match."""
    from training import judges

    probe_cfg = dataclasses.replace(cfg, temperature=cfg.probe_temperature, max_new_tokens=cfg.probe_max_new_tokens)
    data = _data_dir(cfg)
    probes = [("benign.jsonl", cfg.n_benign, "benign", "refusal_rate", "over_refusal_delta",
               lambda r, t: judges.is_refusal(t)),
              ("harmful.jsonl", cfg.n_harmful, "harmful", "harmful_compliance", "harmful_compliance_delta",
               lambda r, t: not judges.is_refusal(t)),
              ("sycophancy.jsonl", cfg.n_sycophancy, "sycophancy", "sycophancy", "sycophancy_delta",
               lambda r, t: not judges.pushes_back(t, r.get("corrections", []))),
              ("regression.jsonl", cfg.n_regression, "regression", "regression_em", "regression_em_delta",
               lambda r, t: judges.answer_matches(t, r["answers"]))]
    m: dict[str, float] = {}
    for file, n, name, key, delta, flag in probes:
        if n <= 0:
            continue
        rows = take(read_jsonl(data / file), n, cfg.seed)
        a, b = pair.both([r["messages"] for r in rows], name, probe_cfg)
        ra = rate([flag(r, x["text"]) for r, x in zip(rows, a, strict=True)])
        rb = rate([flag(r, x["text"]) for r, x in zip(rows, b, strict=True)])
        m.update({f"{key}_candidate": ra, f"{key}_baseline": rb, delta: ra - rb})
    return m


def preference_metrics(pair: _Pair, pairs: list[dict], beta: float, cfg: Config) -> dict[str, float]:
    """Held-out preference accuracy: does each side's implicit reward rank chosen above rejected?"""
    pol = pair.pol
    ps = [json.loads(r["prompt_json"]) for r in pairs]
    ref_c = pol.completion_logprobs(None, ps, [r["chosen"] for r in pairs], cfg.batch_size)
    ref_r = pol.completion_logprobs(None, ps, [r["rejected"] for r in pairs], cfg.batch_size)
    m: dict[str, float] = {}
    for side, key in ((pair.cand, ""), (pair.base, "_baseline")):
        if side.adapter is None:
            continue
        pc = pol.completion_logprobs(side.adapter, ps, [r["chosen"] for r in pairs], cfg.batch_size)
        pr = pol.completion_logprobs(side.adapter, ps, [r["rejected"] for r in pairs], cfg.batch_size)
        margin = beta * ((pc - ref_c) - (pr - ref_r))
        m[f"pref_accuracy{key}"] = float((margin > 0).mean())
        m[f"pref_margin{key}"] = float(margin.mean())
        lo, hi = wilson_interval(float((margin > 0).sum()), len(pairs), cfg.confidence)
        m[f"pref_accuracy{key}_ci_low"], m[f"pref_accuracy{key}_ci_high"] = lo, hi
    m["n_pref_pairs"] = float(len(pairs))
    return m


# --- report -------------------------------------------------------------------------------------

CHART_METRICS = [  # (label, candidate key, baseline key or a fixed reference)
    ("win rate", "win_rate", 0.5), ("LC win rate", "lc_win_rate", 0.5),
    ("list rate", "list_rate_candidate", "list_rate_baseline"),
    ("benign refusal", "refusal_rate_candidate", "refusal_rate_baseline"),
    ("harmful compliance", "harmful_compliance_candidate", "harmful_compliance_baseline"),
    ("sycophancy", "sycophancy_candidate", "sycophancy_baseline"),
    ("regression EM", "regression_em_candidate", "regression_em_baseline"),
    ("pref accuracy", "pref_accuracy", 0.5),
]


def write_chart(m: dict[str, float], path: Path, cand: str, base: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(lbl, m[c], m.get(b, float("nan")) if isinstance(b, str) else b) for lbl, c, b in CHART_METRICS if c in m]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r[1] for r in rows], 0.4, label=f"candidate {cand}")
    ax.bar(x + 0.2, [r[2] for r in rows], 0.4, label=f"baseline {base} (0.5 = parity)", color="#999")
    if "win_rate" in m:
        ax.errorbar([0 - 0.2], [m["win_rate"]], yerr=[[m["win_rate"] - m["win_rate_ci_low"]],
                                                      [m["win_rate_ci_high"] - m["win_rate"]]], fmt="none", c="k")
    ax.set_xticks(x, [r[0] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    extra = [f"length drift {m['length_drift']:+.0%}" if "length_drift" in m else "",
             f"KL {m['kl_per_token']:.3f} nats/token" if "kl_per_token" in m else ""]
    ax.set_title("candidate vs baseline   " + ", ".join(e for e in extra if e))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(m: dict[str, float], details: dict, cfg: Config, cand: Side, base: Side, judge_name: str,
                 folder: Path, gate_lines: list[str] | None, precision: dict[str, Any] | None = None) -> Path:
    hw = precision or {}
    lines = [f"# Evaluation: {cand.label} vs {base.label}", "",
             f"- judge: `{judge_name}`; win-rate prompts: {details.get('winrate_source')}; "
             f"preference pairs: {details.get('pref_pairs', 0)}",
             f"- generation: max_new_tokens={cfg.max_new_tokens}, temperature={cfg.temperature}, top_p={cfg.top_p}, "
             f"seed={cfg.seed}, dtype={hw.get('dtype', cfg.dtype)}; probes: temperature={cfg.probe_temperature}, "
             f"max_new_tokens={cfg.probe_max_new_tokens}",
             f"- machine: {hw.get('cpu_model', '?')}, CPU capability {hw.get('cpu_capability', '?')}, native bf16: "
             f"{', '.join(hw.get('cpu_native_bf16', [])) or 'none'}, {hw.get('threads', '?')} threads; dtype "
             f"{cfg.dtype} -> {hw.get('dtype', '?')} ({hw.get('dtype_reason', '?')})", ""]
    if "judge_accuracy" in m:
        lines += [f"Judge held-out pairwise accuracy {m['judge_accuracy']:.3f} (95% CI {m['judge_accuracy_ci_low']:.3f}–"
                  f"{m['judge_accuracy_ci_high']:.3f}, {m['judge_pairs']:.0f} pairs): the gate counts its verdict "
                  f"only when the lower bound reaches its min_judge_accuracy.", ""]
    if "win_rate" in m:
        lines += [f"**Win rate {m['win_rate']:.3f}** ({cfg.confidence:.0%} bootstrap CI {m['win_rate_ci_low']:.3f}–"
                  f"{m['win_rate_ci_high']:.3f}; {m['wins']:.0f} wins / {m['ties']:.0f} ties / {m['losses']:.0f} "
                  f"losses), length-controlled {m['lc_win_rate']:.3f}, length drift {m['length_drift']:+.1%}.", ""]
    lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(m.items())]
    if gate_lines:
        lines += ["", "## Gate", ""] + [f"- {ln}" for ln in gate_lines]
    lines += ["", "![metrics](chart.png)", "", "## Sample answers", ""]
    for name, rows in details["samples"].items():
        for r in rows[:3]:
            lines += [f"**{name}** — {r['prompt']}", "", "candidate:", "```", r["candidate"], "```",
                      "baseline:", "```", r["baseline"], "```", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the judge's standing ------------------------------------------------------------------------


def refuse_own_judge(judge, candidate_sidecar: dict) -> None:  # noqa: ANN001
    """A judge never grades the candidate it trained: PPO optimised against its reward model, so that
    model's preference for the PPO policy is what PPO maximised, not evidence that users will prefer it."""
    trained_against = candidate_sidecar.get("reward_model_version")
    if trained_against and getattr(judge, "version", None) == str(trained_against):
        raise SystemExit(f"judge {judge.name} is reward model version {trained_against}, which the candidate "
                         f"was trained against ({candidate_sidecar.get('trainer')}); judge with a reward model "
                         f"trained on other data, or pass judge=none (held-out implicit-reward accuracy only)")


def judge_metrics(judge) -> dict[str, float]:  # noqa: ANN001
    """The judge's held-out pairwise accuracy and its interval (reward models); the gate reads the lower
    bound to decide whether the judge's verdict counts. Rule and LLM judges carry no such figure."""
    held = getattr(judge, "heldout", None) or {}
    if "heldout_accuracy" not in held:
        return {}
    return {"judge_accuracy": held["heldout_accuracy"],
            "judge_accuracy_ci_low": held.get("heldout_accuracy_ci_low", float("nan")),
            "judge_accuracy_ci_high": held.get("heldout_accuracy_ci_high", float("nan")),
            "judge_pairs": held.get("heldout_pairs", float("nan"))}


# --- job ----------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What an evaluation compares, and how: both sides, the base model, the dataset, beta, the judge."""

    cand: Side
    base: Side
    adapters: dict[str, Path]  # adapter name -> folder, for Policies
    base_model: str
    dataset_version: str | None
    beta: float
    judge: Any


def resolve(cfg: Config) -> Setup:
    """The candidate (an adapter) and the baseline (an adapter or the base) of one base model, the
    dataset version and beta from the candidate's sidecar unless given, and the judge (never the reward
    model the candidate was trained against)."""
    from ingest import endpoints
    from training import judges

    cache = endpoints.var_dir() / "adapters"
    cand, cand_dir = resolve_side(cfg.candidate, cache, allow_missing=False)
    if cand.adapter is None:
        raise SystemExit("the candidate must be an adapter (registry URI or folder), not the base model")
    base, base_dir = resolve_side(cfg.baseline, cache, allow_missing=True)
    if base.adapter == cand.adapter:
        base.adapter = "baseline-" + base.adapter  # same version on both sides still gets two names
    sidecar = cand.sidecar or {}
    base_model = sidecar.get("base_model") or cfg.base_model
    if base.sidecar and base.sidecar.get("base_model") not in (None, base_model):
        raise SystemExit(f"candidate is on base model {base_model!r} but the baseline {base.label} is on "
                         f"{base.sidecar['base_model']!r}; compare adapters of one base model")
    dataset_version = None if cfg.dataset_version == "none" else (cfg.dataset_version or sidecar.get("dataset_version"))
    beta = cfg.beta or float((sidecar.get("config") or {}).get("beta", 0.1) or 0.1)
    judge = judges.make_judge(cfg.judge)
    refuse_own_judge(judge, sidecar)
    adapters = {cand.adapter: cand_dir, **({base.adapter: base_dir} if base.adapter else {})}
    return Setup(cand, base, adapters, base_model, dataset_version, beta, judge)


def log_run(cfg: Config, st: Setup, pol: Policies, metrics: dict[str, float], details: dict[str, Any],
            decision) -> tuple[str, Path]:  # noqa: ANN001
    """One MLflow run with the metrics and the report folder (chart, report.md, metrics, samples);
    returns (run id, report folder)."""
    import mlflow

    from ingest import endpoints
    from ingest.config import to_dict
    from training import registry

    registry.client()  # sets the tracking URI
    mlflow.set_experiment(cfg.experiment)
    cand, base = st.cand, st.base
    tags = {"flywheel.kind": "evaluation", "flywheel.candidate": cand.label, "flywheel.baseline": base.label,
            "flywheel.judge": st.judge.name, "flywheel.base_model": st.base_model,
            "flywheel.dataset_version": st.dataset_version or "", "flywheel.winrate_source": details["winrate_source"],
            "flywheel.dtype": pol.precision.dtype, "flywheel.cpu_capability": pol.precision.capability,
            "flywheel.cpu_model": pol.precision.cpu_model}
    if cand.ref is not None:
        tags.update({"flywheel.candidate_name": cand.ref.name, "flywheel.candidate_version": cand.ref.version,
                     "flywheel.candidate_run_id": cand.ref.run_id or ""})
    with mlflow.start_run(run_name=f"eval {cand.label} vs {base.label}", tags=tags) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in to_dict(cfg).items()})
        mlflow.log_metrics(metrics)
        folder = Path(cfg.report_dir) if cfg.report_dir else endpoints.var_dir() / "eval" / run.info.run_id
        folder.mkdir(parents=True, exist_ok=True)
        write_chart(metrics, folder / "chart.png", cand.label, base.label)
        write_report(metrics, details, cfg, cand, base, st.judge.name, folder, decision.lines if decision else None,
                     pol.precision.record())
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        with open(folder / "samples.jsonl", "w") as f:
            for name, rows in details["samples"].items():
                for r in rows:
                    f.write(json.dumps({"set": name, **r}) + "\n")
        mlflow.log_artifacts(str(folder), artifact_path="report")
    return run.info.run_id, folder


def tag_version(cand: Side, base: Side, run_id: str, metrics: dict[str, float]) -> None:
    """Link the candidate's model version to its evaluation (run id, baseline, headline figures)."""
    from training import registry

    if cand.ref is None:
        return
    c = registry.client()
    c.set_model_version_tag(cand.ref.name, cand.ref.version, "eval_run_id", run_id)
    c.set_model_version_tag(cand.ref.name, cand.ref.version, "eval.baseline", base.label)
    for k in ("win_rate", "win_rate_ci_low", "lc_win_rate", "length_drift"):
        if k in metrics:
            c.set_model_version_tag(cand.ref.name, cand.ref.version, f"eval.{k}", f"{metrics[k]:.4f}")


def main(cfg: Config) -> dict[str, Any]:
    from ingest import endpoints
    from training import gate

    t0 = time.monotonic()
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)
    st = resolve(cfg)
    pol = Policies(endpoints.model_path(st.base_model), st.adapters, cfg.dtype)
    metrics, details = run_suite(cfg, pol, st.cand, st.base, st.judge, st.dataset_version, st.beta)
    metrics.update(judge_metrics(st.judge))
    elapsed = time.monotonic() - t0
    n_prompts = sum(len(v) for v in details["samples"].values())
    metrics.update(eval_seconds=elapsed, prompts_per_second=2 * n_prompts / elapsed)
    policy_file = REPO / cfg.gate_config if not Path(cfg.gate_config).is_absolute() else cfg.gate_config
    decision = gate.decide(metrics, gate.load_policy(policy_file)) if cfg.gate else None
    run_id, folder = log_run(cfg, st, pol, metrics, details, decision)
    tag_version(st.cand, st.base, run_id, metrics)
    if decision is not None:
        gate.record(decision, run_id, st.cand.ref)
    result: dict[str, Any] = {"run_id": run_id, "candidate": st.cand.label, "baseline": st.base.label,
                              "report": str(folder / "report.md"),
                              "metrics": {k: round(v, 6) for k, v in metrics.items()},
                              "precision": pol.precision.record()}
    if decision is not None:
        result["gate"] = {"passed": decision.passed, "lines": decision.lines}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    from ingest.config import parse_config

    main(parse_config(Config, job_argv(sys.argv[1:], {"--candidate": "candidate", "--baseline": "baseline",
                                                        "--suite": "--config", "--judge": "judge"}, DEFAULT_SUITE)))
