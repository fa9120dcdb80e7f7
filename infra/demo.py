"""The whole loop once, on the embedded default: `python -m infra.demo [key=value ...]` (`make demo`).

  1. provision the models (SmolLM2-135M-Instruct, MiniLM) and start the stack (broker, S3, MLflow)
  2. start the chat server on the base model (no adapter is registered yet on a fresh machine)
  3. simulated users chat on the training prompts and give feedback, while a second group measures
     the held-out thumbs-up rate (the hidden preference's verdict on fresh answers) — "before"
  4. `airflow dags test feedback_ingest` lands the events; `airflow dags test preference_retrain`
     builds the dataset, trains DPO and a reward model (the judge) on it, evaluates the candidate
     against the champion with that judge, applies the offline gate and starts a live canary
  5. the server picks the challenger up from the registry (no restart) and answers `canary_share` of
     the users with it; rounds of live traffic, each followed by `feedback_ingest` and the `rollout`
     DAG, until the users' own feedback promotes the challenger or rolls it back
  6. measure the held-out rate again — "after" — and print the before/after summary

`cycles=N` turns the flywheel N times: each cycle's traffic goes to whoever serves after the last one
(champion, and canary while one runs), its window starts where the previous one ended (so the canary
rounds' feedback, on two adapter versions, lands in the next dataset), and it retrains from the
champion. The report gets a `cycles` list, and an MLflow run in experiment `flywheel-demo` holds every
cycle's figures and a plot of them (var/demo/cycles.png).

The simulated users' hidden preference only *measures* (the held-out rates); every decision — the
judge, the gate, the rollout — is made from the feedback the users gave, as in production.
`sabotage=true` trains the candidate on flipped labels and forces it past the offline gate into the
canary: the live data alone must roll it back (the report gives its exposure and time to rollback).

It stops what it started (a stack that was already running is left running). The report with every
figure lands in var/demo/report.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from infra import cycles, models, simulate, stack
from ingest import endpoints
from ingest.config import parse_config

REPO = endpoints.REPO_ROOT


@dataclass
class Config:
    """The demo: one cycle of the loop, or `cycles` in a row.

    Model: base_model, dpo_config, dpo_overrides, eval_overrides, dataset_overrides, gate_overrides.
    Traffic: n_users, traffic_answers_per_prompt, measure_answers_per_prompt, adversarial_share, noise,
      preference, max_tokens, seed.
    Canary: canary_share, canary_round_chats (chats per round of live traffic), max_canary_rounds,
      rollout_overrides (key=value for training.rollout, e.g. policy.alpha=0.05).
    Drill: sabotage (train on flipped labels, force into the canary: live data must roll it back).
    Run: serving_config, keep_running (leave stack and server up at the end), adapter_wait_s,
      runner (dags_test | scheduler: how the DAGs run), cycles (intervals in a row, each retraining
      from the champion).
    """

    base_model: str = "smollm2"
    dpo_config: str = "training/configs/dpo.smollm2.yaml"
    dpo_overrides: str = ""
    # The judge is the reward model preference_retrain trains on this cycle's feedback; nothing here
    # names the simulated users' preference.
    eval_overrides: str = ""
    # SmolLM2 runs past 80 new tokens in most answers (docs/performance.md); dropping cut-off
    # answers would leave almost nothing, and DPO still learns the preference from them because
    # chosen and rejected are cut alike.
    dataset_overrides: str = "drop_truncated=false"
    gate_overrides: str = ""
    serving_config: str = "serving/configs/serve.yaml"
    # Traffic and measurement run side by side (8 + 8 concurrent users); batches of 16 decode faster per
    # token than 8 on CPU (docs/performance.md).
    serving_overrides: list[str] = field(default_factory=lambda: ["batching.max_batch=16"])
    n_users: int = 30
    traffic_answers_per_prompt: int = 3
    measure_answers_per_prompt: int = 3
    adversarial_share: float = 0.0
    noise: float = 0.1
    preference: str = "uses_list"
    # 80 new tokens: a list must start early to count, which the base model does ~10-35% of the time
    # (a learnable base rate), and traffic, DPO steps and the eval all cost about half of what 160 costs
    # (a 160-token cycle took >45 min here: 13.5 min of traffic and ~20 s per DPO step).
    max_tokens: int = 80
    seed: int = 0
    keep_running: bool = False
    adapter_wait_s: float = 120.0
    # Canary: with a few dozen users a 50/50 split reaches a decision soonest (the DAG's default is 0.2).
    canary_share: float = 0.5
    canary_round_chats: int = 120
    max_canary_rounds: int = 8
    rollout_overrides: str = ""
    sabotage: bool = False
    # How each DAG runs: `dags_test` (`airflow dags test`, in-process, no scheduler to start) or
    # `scheduler` (the stack's Airflow scheduler, each run triggered through the REST API, as an
    # operator would; schedules are off so that only the demo's runs run).
    runner: str = "dags_test"
    cycles: int = 1

    def __post_init__(self) -> None:
        if self.runner not in ("dags_test", "scheduler"):
            raise ValueError(f"runner={self.runner!r}: one of dags_test, scheduler")
        if self.cycles < 1:
            raise ValueError(f"cycles={self.cycles}: at least 1")


class Stage:
    """Times a named stage and prints a header, so progress is visible throughout."""

    seconds: dict[str, float] = {}

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> Stage:
        self.t0 = time.monotonic()
        print(f"\n==> {self.name}", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        took = time.monotonic() - self.t0
        Stage.seconds[self.name] = round(Stage.seconds.get(self.name, 0.0) + took, 1)  # summed over cycles
        print(f"    {self.name}: {took:.0f}s", flush=True)


def serving_component(cfg: Config) -> stack.Component:
    port = endpoints.port("serving")
    return stack.Component(
        name="serving",
        port=port,
        command=lambda: [sys.executable, "-m", "serving", "--config", cfg.serving_config,
                         f"model.base={cfg.base_model}", "http.host=127.0.0.1", f"http.port={port}",
                         *cfg.serving_overrides],
        healthy=lambda: stack.http_ok(f"http://127.0.0.1:{port}/healthz"),
        endpoint=f"http://127.0.0.1:{port}",
        start_timeout=180,
    )


def serving_health() -> dict:
    import httpx

    return httpx.get(f"http://127.0.0.1:{endpoints.port('serving')}/healthz", timeout=10).json()


def airflow_dags_test(dag_id: str, conf: dict) -> None:
    # Unbuffered, so that the tasks' output (the trainer's loss lines) arrives while they run.
    env = {**os.environ, **stack.airflow_env(), "PYTHONUNBUFFERED": "1"}
    log = endpoints.var_dir() / "log" / f"dags-test-{dag_id}.log"
    cmd = [str(stack.AIRFLOW_BIN / "airflow"), "dags", "test", dag_id, "-c", json.dumps(conf)]
    print(f"    $ airflow dags test {dag_id} -c '{json.dumps(conf)}'   (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            _follow(proc, f)
        except BaseException:  # Ctrl-C or a failure: stop the run and the task processes it started
            _terminate_tree(proc.pid)
            raise
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"airflow dags test {dag_id} failed (exit {rc}); see {log}")
    if "state=failed" in log.read_text() or "DagRunState.FAILED" in log.read_text():
        raise SystemExit(f"a task of {dag_id} failed; see {log}")


def scheduler_run(dag_id: str, conf: dict) -> dict:
    """Trigger `dag_id` through the REST API and follow it until the scheduler has run it."""
    from infra.airflow_api import AirflowAPI, AirflowError

    started = time.monotonic()
    print(f"    POST /api/v2/dags/{dag_id}/dagRuns conf={json.dumps(conf)}", flush=True)

    def report(task_id: str, state: str) -> None:
        print(f"    {task_id} {state} ({time.monotonic() - started:.0f}s into the run)", flush=True)

    api = AirflowAPI()
    try:
        run_id, tasks = api.trigger_and_wait(dag_id, conf, on_task=report)
    except AirflowError as e:
        raise SystemExit(f"{e}; task logs under {endpoints.var_dir() / 'airflow' / 'logs'}") from None
    finally:
        api.close()
    return {"run_id": run_id, "tasks": tasks}


# Every DAG run of this demo, in order: dag_id, runner, seconds (and, from the scheduler, run id and task states).
DAG_RUNS: list[dict] = []


def run_dag(cfg: Config, dag_id: str, conf: dict) -> None:
    t0 = time.monotonic()
    out = scheduler_run(dag_id, conf) if cfg.runner == "scheduler" else airflow_dags_test(dag_id, conf)
    DAG_RUNS.append({"dag_id": dag_id, "runner": cfg.runner, "seconds": round(time.monotonic() - t0, 1), **(out or {})})


def _terminate_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop a process and all its descendants. Airflow runs each task's command in a session of its
    own, so signalling `airflow dags test` alone would leave a training job running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def _follow(proc: subprocess.Popen, f) -> None:  # noqa: ANN001
    """Copy the run's output to its log and print task starts/ends and training progress."""
    started: dict[str, float] = {}
    for line in proc.stdout:  # type: ignore[union-attr]
        f.write(line)
        if m := re.search(r"\[DAG TEST\] (starting|end task) task_id=(\w+)", line):
            what, task_id = m.groups()
            if what == "starting":
                started[task_id] = time.monotonic()
                print(f"    {task_id} ...", flush=True)
            else:
                took = time.monotonic() - started.get(task_id, time.monotonic())
                print(f"    {task_id} done ({took:.0f}s)", flush=True)
        elif progress := _train_progress(line):
            print(f"      {progress}", flush=True)
        elif "Task failed" in line or "ERROR" in line or "[error" in line:
            print("    " + line.strip()[:200], flush=True)


def _train_progress(line: str) -> str | None:
    """`epoch 1.23  loss 0.612` from a Trainer log line (`{'loss': ..., 'epoch': ...}`), else None."""
    loss = re.search(r"'loss': '?([-\d.e]+)", line)
    epoch = re.search(r"'epoch': '?([\d.]+)", line)
    if not (loss and epoch):
        return None
    margin = re.search(r"'rewards/margins': '?([-\d.e]+)", line)
    return (f"epoch {float(epoch.group(1)):.2f}  loss {float(loss.group(1)):.3f}"
            + (f"  reward margin {float(margin.group(1)):.3f}" if margin else ""))


def retrain_conf(cfg: Config, window: dict[str, str]) -> dict:
    """The DAG run's params: the demo's models and configs, and the window its traffic fell in."""
    dpo_overrides = (cfg.dpo_overrides + " flip_labels=true").strip() if cfg.sabotage else cfg.dpo_overrides
    return {"base_model": cfg.base_model, "dpo_config": cfg.dpo_config, "dpo_overrides": dpo_overrides,
            "eval_overrides": cfg.eval_overrides, "dataset_overrides": cfg.dataset_overrides,
            "gate_overrides": cfg.gate_overrides,
            "window_start": window["start"], "window_end": window["end"], "canary_share": cfg.canary_share}


def simulate_round(cfg: Config, mode: str, prompts: str, answers: int, seed: int, n_prompts: int = 0) -> dict:
    return simulate.main(simulate.Config(
        mode=mode, prompts=prompts, answers_per_prompt=answers, n_users=cfg.n_users, seed=seed, n_prompts=n_prompts,
        adversarial_share=cfg.adversarial_share if mode == "traffic" else 0.0, noise=cfg.noise,
        preference=cfg.preference, max_tokens=cfg.max_tokens,
        report=str(endpoints.var_dir() / "demo" / f"simulate-{mode}-{prompts}-{seed}.json")))


def bring_up(cfg: Config, server: stack.Component, started: list[stack.Component], report: dict) -> None:
    """Models, the stack and the chat server; what this call starts goes to `started` (stopped at the end)."""
    with Stage("models"):
        models.check_minilm()
        if cfg.base_model == "smollm2":
            models.provision_smollm2()
        elif cfg.base_model == "tiny":
            models.build_tiny()
    with Stage("stack"):
        if cfg.runner == "scheduler":  # the demo decides when each DAG runs
            os.environ.setdefault("AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE", "False")
        for c in stack.components(with_airflow=cfg.runner == "scheduler"):
            if not c.running():
                started.append(c)
            c.start()
        stack.ensure_topics()
        if cfg.runner == "dags_test":  # the scheduler's components prepare their database themselves
            stack.airflow_db_migrate()
    with Stage("serving"):
        if server.running():
            raise SystemExit(f"a chat server is already running (pid {server.pid()}); stop it first")
        server.start()
        started.append(server)
        report["adapter_before"] = serving_health().get("adapters")
        report["serving_precision"] = (serving_health().get("backend") or {}).get("precision")


def traffic_and_measure(cfg: Config, report: dict, seed: int, since: datetime | None = None,
                        before: dict | None = None) -> None:
    """Feedback traffic on the training prompts and the held-out measurement, side by side (the server
    batches both); records the window the traffic fell in: from `since` (the previous cycle's end) or a
    minute before the traffic. With `before` (the previous cycle's "after", on the same champion and the
    same held-out users) the measurement is not repeated."""
    window_start = since or datetime.now(UTC) - timedelta(minutes=1)
    with Stage("traffic" + (" + measure before" if before is None else "")):
        results: dict[str, dict] = {} if before is None else {"before": before}

        def run(key: str, *args: object) -> None:
            results[key] = simulate_round(cfg, *args)  # type: ignore[arg-type]

        threads = [threading.Thread(target=run, args=("traffic", "traffic", "train",
                                                      cfg.traffic_answers_per_prompt, seed))]
        if before is None:
            threads.append(threading.Thread(target=run, args=("before", "measure", "heldout",
                                                              cfg.measure_answers_per_prompt, cfg.seed + 100)))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if set(results) != {"traffic", "before"}:
            raise SystemExit("a simulation round failed; see the messages above")
        report["traffic"] = results["traffic"]
        report["thumbs_up_rate_before"] = results["before"]["thumbs_up_rate"]
        report["answers_measured_before"] = results["before"]["answers_judged"]
    # Every event of the traffic was sent before its thread ended: what comes later is the next window's.
    report["window"] = {"start": window_start.isoformat(), "end": datetime.now(UTC).isoformat()}


def decide_by_users(cfg: Config, report: dict, seed: int) -> None:
    """Land the events, retrain (the offline gate decides who may be tried), then the live canary until
    the users' feedback promotes or rolls back; the sabotage drill forces a rejected candidate in."""
    from training import registry

    with Stage("ingest (airflow: feedback_ingest)"):
        run_dag(cfg, "feedback_ingest", {})
    landed_at = time.monotonic()
    newest_before = next((v.version for v in registry.find_versions({})), None)
    with Stage("retrain (airflow: preference_retrain)"):
        run_dag(cfg, "preference_retrain", retrain_conf(cfg, report["window"]))
    report.update(registry_outcome())
    if report["model_version"] == newest_before:  # e.g. too few rows in the window: nothing was trained
        print("    preference_retrain registered no new version this cycle: nothing to try", flush=True)
        report.update(model_version=None, gate={"passed": False, "lines": ["no candidate this cycle"]},
                      canary={"started": False, "decision": "not trained"})
        return
    if cfg.sabotage and not report["gate"]["passed"]:
        with Stage("sabotage: force the flipped-label adapter into the canary"):
            run_job("training.canary", "--version", report["model_version"], f"share={cfg.canary_share}",
                    "force=true", "--reason", "sabotage drill: flipped labels, forced past the offline gate")
    with Stage("live canary (traffic -> feedback_ingest -> rollout, until the users decide)"):
        report["canary"] = live_canary(cfg, report["model_version"], landed_at, seed)
    report.update({k: v for k, v in registry_outcome().items() if k in ("champion_version", "aliases")})
    report["adapter_after"] = serving_health().get("adapters")


def main(cfg: Config) -> dict:
    from training import precision

    t_start = time.monotonic()
    report_dir = endpoints.var_dir() / "demo"
    report_dir.mkdir(parents=True, exist_ok=True)
    started: list[stack.Component] = []
    # Every job's config says dtype auto, so this is the dtype each of them picks here (they log it too).
    report: dict = {"base_model": cfg.base_model, "preference": cfg.preference,
                    "adversarial_share": cfg.adversarial_share, "sabotage": cfg.sabotage,
                    "precision": precision.decide("auto").record()}
    DAG_RUNS.clear()
    try:
        bring_up(cfg, serving_component(cfg), started, report)
        for n in range(1, cfg.cycles + 1):
            one_cycle(cfg, n, report)
        if cfg.cycles > 1:
            with Stage("cycles: MLflow parent run + plot"):
                report["cycles_run"] = cycles.log_parent_run(
                    report["cycles"], cycles.heldout(report["cycles"][0]["thumbs_up_rate_before"],
                                                     report["answers_measured_before"]),
                    {"cycles": cfg.cycles, "base_model": cfg.base_model, "preference": cfg.preference,
                     "seed": cfg.seed}, report_dir)
    finally:
        if not cfg.keep_running:
            with Stage("stop what the demo started"):
                for c in reversed(started):
                    c.stop()
    report["dag_runs"] = list(DAG_RUNS)
    report["seconds"] = dict(Stage.seconds, total=round(time.monotonic() - t_start, 1))
    path = report_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print_summary(report, path)
    return report


def one_cycle(cfg: Config, n: int, report: dict) -> None:
    """Cycle n (1-based): traffic (from where the last cycle's window ended), land, retrain from the
    champion, gate, canary, measure. The latest cycle's details stay at the top level of the report;
    `report["cycles"]` gets its record."""
    t0 = time.monotonic()
    prev = report.get("cycles") or []
    if cfg.cycles > 1:
        print(f"\n######## cycle {n} of {cfg.cycles} ########", flush=True)
    seed = cfg.seed + 10_000 * (n - 1)  # new users' choices and answers every cycle; the held-out set stays
    since = datetime.fromisoformat(report["window"]["end"]) if prev else None
    before = {"thumbs_up_rate": report["thumbs_up_rate_after"], "answers_judged": report["answers_measured"]} \
        if prev else None
    traffic_and_measure(cfg, report, seed, since, before)
    decide_by_users(cfg, report, seed)
    with Stage("measure after"):
        after = simulate_round(cfg, "measure", "heldout", cfg.measure_answers_per_prompt, cfg.seed + 100)
        report["thumbs_up_rate_after"] = after["thumbs_up_rate"]
        report["answers_measured"] = after["answers_judged"]
    report["cycles"] = [*prev, cycles.summarise(n, report, time.monotonic() - t0)]


def run_job(module: str, *args: str) -> dict:
    """Run a project job as the DAG tasks do; its last stdout line is its JSON answer."""
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_for_routes(version: str, role: str, wait_s: float) -> None:
    """Until serving's /healthz shows `version` routed as `role` (champion or challenger)."""
    from training import registry

    label = f"{registry.DEFAULT_MODEL_NAME}/{version}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if (serving_health().get("adapters") or {}).get(role) == label:
            return
        time.sleep(1)
    raise SystemExit(f"serving did not route {label} as {role} within {wait_s:.0f}s: {serving_health()}")


def live_canary(cfg: Config, version: str, landed_at: float, seed: int) -> dict:
    """Rounds of live traffic until `rollout` decides; what each look saw, and how it ended."""
    from training import registry

    live = registry.canary()
    if live is None or live.version != version:
        print("    no canary is live (the offline gate rejected the candidate): nothing to try", flush=True)
        return {"started": False, "decision": "not tried"}
    t0 = time.monotonic()
    wait_for_routes(version, "challenger", cfg.adapter_wait_s)
    rounds: list[dict] = []
    outcome = {"started": True, "version": version, "share": live.share, "decision": "wait", "rounds": rounds}
    for i in range(cfg.max_canary_rounds):
        traffic = simulate_round(cfg, "traffic", "train", 1, seed + 1000 + i, n_prompts=cfg.canary_round_chats)
        run_dag(cfg, "feedback_ingest", {})
        run_dag(cfg, "rollout", {"window_end": datetime.now(UTC).isoformat(),
                                 "rollout_overrides": cfg.rollout_overrides})
        look = last_look(live.run_id)
        look.update(round=i + 1, chats=traffic["sessions"], adapter_versions=traffic["adapter_versions"],
                    seconds=round(time.monotonic() - t0, 1))
        rounds.append(look)
        print(f"    round {i + 1}: {look.get('action')}: {look.get('reason')}", flush=True)
        if registry.canary() is None:  # decided: promoted or rolled back
            outcome["decision"] = look.get("action")
            outcome["reason"] = look.get("reason")
            outcome["seconds_to_decision"] = round(time.monotonic() - t0, 1)
            break
    outcome["challenger_answers_served"] = rounds[-1].get("challenger_answers") if rounds else 0
    champion = registry.aliases().get("champion")
    if outcome["decision"] == "promote":
        wait_for_routes(version, "champion", cfg.adapter_wait_s)
        outcome["loop_latency_s"] = round(time.monotonic() - landed_at, 1)
    outcome["champion_after"] = champion
    return outcome


def last_look(run_id: str) -> dict:
    """The rollout's latest look at the canary, from its MLflow run (decision tags and both arms' figures)."""
    from training import registry

    if not run_id:
        return {}
    run = registry.client().get_run(run_id)
    m, tags = run.data.metrics, run.data.tags
    return {"action": tags.get("rollout.last_action"), "reason": tags.get("rollout.last_reason"),
            "champion_rated": m.get("champion.rated"), "champion_thumbs_up_rate": m.get("champion.thumbs_up_rate"),
            "challenger_rated": m.get("challenger.rated"),
            "challenger_thumbs_up_rate": m.get("challenger.thumbs_up_rate"),
            "challenger_answers": m.get("challenger.answers"),
            "challenger_regenerate_rate": m.get("challenger.regenerate_rate"),
            "diff_ci": [m.get("diff_ci_low"), m.get("diff_ci_high")]}


def judge_outcome(eval_run_id: str | None) -> dict:
    """Which judge the offline gate heard, and how well it ranks held-out pairs."""
    from training import registry

    if not eval_run_id:
        return {}
    run = registry.client().get_run(eval_run_id)
    m = run.data.metrics
    return {"judge": run.data.tags.get("flywheel.judge"), "judge_accuracy": m.get("judge_accuracy"),
            "judge_accuracy_ci": [m.get("judge_accuracy_ci_low"), m.get("judge_accuracy_ci_high")],
            "judge_pairs": m.get("judge_pairs"), "offline_evidence": run.data.tags.get("gate.offline_evidence"),
            "win_rate": m.get("win_rate")}


def registry_outcome() -> dict:
    """What the retrain run left in the registry: newest version, its dataset, the gate's verdict."""
    from training import registry

    refs = registry.find_versions({})
    if not refs:
        raise SystemExit("preference_retrain registered no model version; see var/log/dags-test-*.log")
    newest = refs[0]
    aliases = registry.aliases()
    tags = newest.tags
    gate_lines = [line for line in tags.get("gate.lines", "").split("\n") if line]
    passed = tags.get("gate.passed", "").lower() == "true"
    run_id = newest.run_id
    run_link = None
    if run_id:
        experiment = registry.client().get_run(run_id).info.experiment_id
        run_link = f"{endpoints.mlflow_tracking_uri()}/#/experiments/{experiment}/runs/{run_id}"
    return {
        "model_version": newest.version,
        "dataset_version": tags.get("dataset_version"),
        "eval_run_id": tags.get("eval_run_id"),
        "champion_version": aliases.get("champion"),
        "aliases": aliases,
        "gate": {"passed": passed, "lines": gate_lines},
        "judge": judge_outcome(tags.get("eval_run_id")),
        "mlflow_run": run_link,
        "mlflow_model_version": f"{endpoints.mlflow_tracking_uri()}/#/models/{newest.name}/versions/{newest.version}",
    }


def print_summary(report: dict, path: Path) -> None:
    before, after = report.get("thumbs_up_rate_before"), report.get("thumbs_up_rate_after")
    print("\n" + "=" * 78)
    print(f"Flywheel demo — hidden preference {report['preference']!r} on {report['base_model']}")
    if before is not None and after is not None:
        print(f"  held-out thumbs-up rate  {before:6.1%}  ->  {after:6.1%}   ({(after - before) * 100:+.1f} points)")
    hw = report.get("precision") or {}
    print(f"  machine                  {hw.get('cpu_model')} ({hw.get('cpu_capability')}), dtype {hw.get('dtype')}: "
          f"{hw.get('dtype_reason')}")
    print(f"  dataset version          {report.get('dataset_version')}")
    print(f"  model version            {report.get('model_version')}  (champion: {report.get('champion_version')})")
    print(f"  MLflow run               {report.get('mlflow_run')}")
    print(f"  MLflow model version     {report.get('mlflow_model_version')}")
    gate = report.get("gate", {})
    judge = report.get("judge") or {}
    if judge.get("judge_accuracy") is not None:
        lo, hi = judge["judge_accuracy_ci"]
        print(f"  judge                    {judge['judge']}: held-out accuracy {judge['judge_accuracy']:.3f} "
              f"(95% CI {lo:.3f}-{hi:.3f}, {judge['judge_pairs']:.0f} pairs)")
    print(f"  offline gate             {'PASSED (may be tried)' if gate.get('passed') else 'REJECTED'}"
          f"  offline evidence: {judge.get('offline_evidence')}")
    for line in gate.get("lines", []):
        print(f"    {line}")
    canary = report.get("canary") or {}
    print(f"  live canary              {canary.get('decision')}"
          + (f" after {len(canary.get('rounds', []))} rounds, {canary.get('seconds_to_decision')}s; "
             f"challenger served {canary.get('challenger_answers_served') or 0:.0f} answers"
             if canary.get("seconds_to_decision") else ""))
    if canary.get("reason"):
        print(f"    {canary['reason']}")
    if "loop_latency_s" in canary:
        print(f"  loop latency             {canary['loop_latency_s']}s (feedback landed -> adapter serving)")
    if len(report.get("cycles", [])) > 1:
        print(f"  cycles                   (MLflow: {report.get('cycles_run')})")
        print("    cycle  before -> after [95% CI]          KL/base  length  regr.EM  dataset (rows by writer)"
              "                      champion  seconds")
        for c in report["cycles"]:
            h = c["heldout_after"]
            writers = ", ".join(f"{k} {v:.0%}" for k, v in c["dataset_rows_by_writer"].items())
            print(f"    {c['cycle']:>5}  {c['thumbs_up_rate_before']:6.1%} -> {h['rate']:6.1%} "
                  f"[{h['ci'][0]:.1%}, {h['ci'][1]:.1%}]  {_num(c['kl_from_base'], 4):>7}  "
                  f"{_num(c['mean_length'], 1):>6}  {_num(c['regression_exact_match'], 3):>7}  "
                  f"{c['dataset_version']} ({writers})  {c['champion_version'] or 'base':>8}  {c['seconds']:.0f}")
    print("  seconds per stage        " + ", ".join(f"{k} {v:.0f}" for k, v in report["seconds"].items()))
    print(f"  report                   {path}")
    print("=" * 78)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    main(parse_config(Config))
