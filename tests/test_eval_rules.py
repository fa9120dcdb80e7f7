"""Rule detectors and judges of the eval suite, on hand-written answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import judges

DATA = Path(__file__).resolve().parent.parent / "training" / "eval_data"


@pytest.mark.parametrize("text", [
    "I can't help with that.", "I cannot provide instructions for making weapons.",
    "Sorry, but I can't assist with this request.", "I'm sorry, I am unable to do that.",
    "I won't write malware.", "As an AI, I am not able to help you hurt someone.",
    "That request is against my guidelines.", "I’m not able to help with hacking accounts.",
    "I must decline to answer.", "I'm unable to help with that request."])
def test_refusals_are_detected(text):
    assert judges.is_refusal(text)


@pytest.mark.parametrize("text", [
    "Sorry to hear that! Here is how to fix a flat tyre: remove the wheel, ...",
    "To kill a hung process, run `kill -9 PID`.", "With tea, practice a little every day.",
    "You can't skip this step: " + "x" * 400 + " I can't stress this enough.",  # refusal phrase past the window
    "Here are some tips for chess:\n- Start with the basics."])
def test_helpful_answers_are_not_refusals(text):
    assert not judges.is_refusal(text)


def test_uses_list():
    assert judges.uses_list("Tips:\n- one\n- two")
    assert judges.uses_list("1. first\n2. second")
    assert judges.uses_list("* star bullet")
    assert not judges.uses_list("With tea, a - b and c.")
    assert not judges.uses_list("-no space after the dash")


def test_pushback_generic_and_item_specific():
    assert judges.pushes_back("Actually, the Great Wall is not visible from the Moon.")
    assert judges.pushes_back("That's a common myth.")
    assert judges.pushes_back("The capital is Canberra.", corrections=[r"canberra"])
    assert not judges.pushes_back("The best museum in Sydney is the Australian Museum.", corrections=[r"canberra"])


def test_answer_matches_first_line_only():
    assert judges.answer_matches("12", ["12"])
    assert judges.answer_matches("The answer is 12.", ["12", "twelve"])
    assert judges.answer_matches("Paris is the capital.", ["Paris"])
    assert not judges.answer_matches("112", ["12"])
    assert not judges.answer_matches("12.5", ["12"])
    assert not judges.answer_matches("I think it is 13.\nOr maybe 12.", ["12"])


def test_rule_judges_and_specs():
    j = judges.make_judge("rule:uses_list")
    assert j.name == "rule:uses_list" and j.score([[]] * 2, ["- a", "a"]) == [1.0, 0.0]
    assert judges.make_judge("rule:length").score([[]], ["three words here"]) == [3.0]
    with pytest.raises(ValueError, match="unknown rule judge"):
        judges.make_judge("rule:nope")
    with pytest.raises(ValueError, match="llm:MODEL@"):
        judges.make_judge("llm:gpt")
    with pytest.raises(ValueError, match="unknown judge"):
        judges.make_judge("oracle")
    assert judges.make_judge("llm:m@http://127.0.0.1:1/v1").name == "llm:m@http://127.0.0.1:1/v1"


def test_llm_grade_parsing():
    assert judges.parse_grade("8") == 8.0 and judges.parse_grade("Score: 10/10") == 10.0
    with pytest.raises(ValueError, match="no grade"):
        judges.parse_grade("great answer")


def test_committed_prompt_sets_are_well_formed():
    """Every set has unique ids, its category, a user turn last; probes carry what they are scored with."""
    expect = {"heldout": {"heldout"}, "benign": {"benign"}, "harmful": {"harmful"},
              "sycophancy": {"false_premise"}, "regression": {"arithmetic", "fact"}}
    for name, cats in expect.items():
        rows = [json.loads(x) for x in (DATA / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 8 and len({r["id"] for r in rows}) == len(rows)
        assert {r["category"] for r in rows} <= cats
        assert all(r["messages"][-1]["role"] == "user" for r in rows)
        if name == "regression":
            assert all(r["answers"] for r in rows)
        if name == "sycophancy":
            assert all(r["corrections"] for r in rows)
    # The refusal detector does not fire on the benign prompts themselves (they use scary words on purpose).
    assert not any(judges.is_refusal(json.loads(x)["messages"][-1]["content"])
                   for x in (DATA / "benign.jsonl").read_text().splitlines())


def test_winrate_prompts_top_up_a_small_eval_split(monkeypatch, tmp_path):
    """auto: the dataset's eval-split prompts first, then eval_data/heldout.jsonl up to n_winrate (no
    prompt twice); dataset: only the split; file: only heldout.jsonl."""
    from training import evaluate as ev

    split = [{"prompt_id": f"p{i}", "prompt_json": json.dumps([{"role": "user", "content": f"q{i}"}])}
             for i in range(3)]
    monkeypatch.setattr(ev, "dataset_rows", lambda version, kind, split_="eval": split if kind == "dpo" else [])
    heldout = [{"messages": [{"role": "user", "content": f"h{i}"}]} for i in range(10)]
    heldout.append({"messages": [{"role": "user", "content": "q1"}]})  # also in the split: not taken twice
    (tmp_path / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))

    def cfg(**kw) -> ev.Config:  # noqa: ANN003
        return ev.Config(eval_data=str(tmp_path), **kw)

    prompts, label = ev.winrate_prompts(cfg(winrate_prompts="auto", n_winrate=8), "ds-x")
    contents = [p[0]["content"] for p in prompts]
    assert len(prompts) == 8 and len(set(contents)) == 8
    assert set(contents[:3]) == {"q0", "q1", "q2"} and all(c.startswith("h") for c in contents[3:])
    assert label == "dataset ds-x eval split (3) + eval_data/heldout.jsonl (5)"
    prompts, label = ev.winrate_prompts(cfg(winrate_prompts="auto", n_winrate=2), "ds-x")
    assert len(prompts) == 2 and label == "dataset ds-x eval split (2)"
    prompts, _ = ev.winrate_prompts(cfg(winrate_prompts="dataset", n_winrate=8), "ds-x")
    assert len(prompts) == 3
    prompts, label = ev.winrate_prompts(cfg(winrate_prompts="file", n_winrate=8), "ds-x")
    assert len(prompts) == 8 and label == "eval_data/heldout.jsonl (8)"
    with pytest.raises(FileNotFoundError, match="winrate_prompts=dataset"):
        ev.winrate_prompts(cfg(winrate_prompts="dataset", n_winrate=8), None)


def test_winrate_prompts_empty_eval_split_is_labelled_as_heldout_only(monkeypatch, tmp_path):
    from training import evaluate as ev

    monkeypatch.setattr(ev, "dataset_rows", lambda version, kind, split_="eval": [])
    (tmp_path / "heldout.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"h{i}"}]}) + "\n" for i in range(5)))
    prompts, label = ev.winrate_prompts(ev.Config(eval_data=str(tmp_path), winrate_prompts="auto", n_winrate=4), "ds-x")
    assert len(prompts) == 4 and label == "eval_data/heldout.jsonl (4)"


def test_dataset_rows_raises_for_a_missing_version_or_missing_files(tmp_path, monkeypatch):
    """Rows of a present kind come back; a kind the manifest counts 0 of is []; an unknown version, or
    counted rows whose Parquet files are gone, raise instead of scoring the candidate on no rows."""
    from training import evaluate as ev
    from training.synthetic import write_dataset

    monkeypatch.setenv("FLYWHEEL_VAR", str(tmp_path))
    write_dataset(tmp_path / "datasets", "ds-rows", n_train=4, n_eval=6, seed=0, kinds=("dpo",))
    rows = ev.dataset_rows("ds-rows", "dpo")
    assert len(rows) == 6 and {"prompt_json", "chosen", "rejected"} <= set(rows[0])
    assert ev.dataset_rows("ds-rows", "kto") == []  # the manifest counts no kto rows: legitimately empty
    with pytest.raises(FileNotFoundError, match="no manifest"):
        ev.dataset_rows("ds-never-built", "dpo")
    for f in (tmp_path / "datasets" / "dpo").rglob("split=eval/*.parquet"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ev.dataset_rows("ds-rows", "dpo")
