"""The users decide, against a real MLflow registry: a gate pass starts a canary that serving follows,
and `training.rollout` promotes a challenger the users prefer, rolls back one they dislike or one that
trips a guardrail, waits when the evidence is thin, and changes nothing when an interval is re-run.

Feedback is landed straight into the landing zone (the consumer has tests of its own); the adapters are
minimal folders, since alias moves never read the weights.
"""

from __future__ import annotations

import itertools
import json
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ingest import landing
from ingest.events import FeedbackEvent, ResponseEvent

pytestmark = pytest.mark.stack
_ids = itertools.count()


def register(name: str, tmp: Path, passed: str) -> str:
    import mlflow

    from training import registry

    folder = tmp / f"adapter{next(_ids)}"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / registry.SIDECAR).write_text(json.dumps({"base_model": "tiny", "trainer": "dpo"}))
    mlflow.set_experiment("rollout-test")
    with mlflow.start_run() as run:
        return registry.register_adapter(folder, run.info.run_id, name=name, tags={"gate.passed": passed}).version


@pytest.fixture
def model(stack, tmp_path) -> dict:
    """A registered model with champion v1 and a gate-passed candidate v2 under a live 50% canary."""
    from training import canary, promote

    name = f"rollout-test-{next(_ids)}-{random.randrange(10**6)}"
    v1, v2 = register(name, tmp_path, "true"), register(name, tmp_path, "true")
    promote.main(promote.Config(version=v1, model_name=name, reason="first release", actor="pytest"))
    canary.main(canary.Config(version=v2, share=0.5, model_name=name, reason="gate passed", actor="pytest"))
    return {"name": name, "champion": v1, "challenger": v2}


def land_arm(name: str, version: str, arm: str, n: int, p_up: float, p_regenerate: float = 0.0,
             seed: int = 0) -> None:
    """n rated answers of `version`, a share p_up of them thumbs-up, p_regenerate of them regenerated."""
    rng = random.Random(seed)
    at = datetime.now(UTC)
    events: list = []
    for _ in range(n):
        rid = f"r{next(_ids)}-{rng.random()}"
        r = ResponseEvent(event_id=rid, created_at=at, user_id="u", conversation_id="c", response_id=rid,
                          adapter_version=f"{name}/{version}", prompt=[{"role": "user", "content": "q"}],
                          completion="a", finish_reason="stop", base_model="tiny", ab_arm=arm,
                          sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 8, "seed": 1},
                          completion_logprob=-1.0, prompt_tokens=1, completion_tokens=1, latency_ms=1.0)
        kinds = ["thumbs_up" if rng.random() < p_up else "thumbs_down"]
        if rng.random() < p_regenerate:
            kinds.append("regenerate")
        events.append(r)
        events += [FeedbackEvent(event_id=f"f{next(_ids)}", created_at=at, user_id="u", conversation_id="c",
                                 response_id=rid, adapter_version=r.adapter_version, kind=k) for k in kinds]
    # Distinct offsets per call: a landing file is named by the coordinates it holds.
    landing.write_batch([landing.to_row(e, landing.event_type(e), 0, next(_ids)) for e in events])


def rollout(name: str, **kw) -> dict:  # noqa: ANN003
    from training import rollout as job

    end = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    return job.main(job.Config(model_name=name, window_end=kw.pop("window_end", end), actor="pytest", **kw))


def test_canary_share_reaches_serving_without_restart(model, tmp_path):
    """The router reads the live canary's share from the registry at each poll: 0.5, not its configured 0."""
    from serving import adapters
    from training import registry

    class Backend:
        def load_adapter(self, name: str, folder: str | Path) -> None: ...
        def unload_adapter(self, name: str) -> None: ...

    router = adapters.AdapterRouter(Backend(), base_model="tiny", model_name=model["name"], adapters_dir=tmp_path)
    router.refresh()
    assert router.state()["challenger"] == f"{model['name']}/{model['challenger']}"
    assert router.state()["challenger_share"] == 0.5
    arms = {router.choose(f"user-{i}").arm for i in range(200)}
    assert arms == {"champion", "challenger"}
    registry.clear_canary(model["name"])  # as a rollback does
    router.refresh()
    assert router.state()["challenger"] is None and {router.choose(f"user-{i}").arm for i in range(50)} == {"champion"}


def test_better_challenger_is_promoted_and_rerun_is_a_no_op(model):
    from training import registry

    name = model["name"]
    land_arm(name, model["champion"], "champion", 400, 0.50, seed=1)
    land_arm(name, model["challenger"], "challenger", 400, 0.75, seed=2)
    out = rollout(name)
    assert out["action"] == "promote", out
    # The look is in the canary's MLflow run: both arms' rates at step = rated answers, and the plot.
    c = registry.client()
    (look,) = c.get_metric_history(out["run_id"], "challenger.thumbs_up_rate")
    assert look.step == 800 and abs(look.value - out["arms"]["challenger"]["thumbs_up_rate"]) < 1e-9
    assert "rollout.png" in [a.path for a in c.list_artifacts(out["run_id"])]
    assert c.get_run(out["run_id"]).data.tags["rollout.last_action"] == "promote"
    assert registry.aliases(name)["champion"] == model["challenger"]
    assert registry.aliases(name)["previous"] == model["champion"]
    assert registry.canary(name) is None and "challenger" not in registry.aliases(name)
    again = rollout(name, window_end=out["window_end"])
    assert again["action"] == "none" and not again["changed"]
    assert registry.aliases(name)["champion"] == model["challenger"]


def test_worse_challenger_is_rolled_back(model):
    from training import promote, registry

    name = model["name"]
    land_arm(name, model["champion"], "champion", 400, 0.70, seed=3)
    land_arm(name, model["challenger"], "challenger", 400, 0.40, seed=4)
    out = rollout(name)
    assert out["action"] == "rollback", out
    assert registry.aliases(name)["champion"] == model["champion"]
    assert registry.canary(name) is None and "challenger" not in registry.aliases(name)
    assert promote.history(name)[-1]["action"] == "canary_rollback"


def test_guardrail_rolls_back_even_when_thumbs_look_good(model):
    from training import registry

    name = model["name"]
    land_arm(name, model["champion"], "champion", 400, 0.60, p_regenerate=0.05, seed=5)
    land_arm(name, model["challenger"], "challenger", 400, 0.62, p_regenerate=0.40, seed=6)
    out = rollout(name)
    assert out["action"] == "rollback" and "regenerate" in out["reason"], out
    assert registry.aliases(name)["champion"] == model["champion"]


def test_thin_evidence_waits_and_an_old_window_changes_nothing(model):
    from training import registry

    name = model["name"]
    land_arm(name, model["champion"], "champion", 15, 0.6, seed=7)
    land_arm(name, model["challenger"], "challenger", 15, 0.6, seed=8)
    out = rollout(name)
    assert out["action"] == "wait" and out["more_needed"] and out["more_needed"] > 0, out
    assert registry.canary(name).last_window_end == out["window_end"]
    time.sleep(0.01)
    stale = rollout(name, window_end=out["window_end"])
    assert stale["action"] == "none" and "looked at already" in stale["reason"]
    assert registry.canary(name) is not None
