"""Pure rules of the dataset builder, on hand-built answers with the expected rows written out:
pairing (ingest/pairing.py), PII scrubbing (ingest/pii.py), the poisoning test and per-user caps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ingest import pii
from ingest.build_dataset import Config, binom_sf, cli_args, flag_poisoners, parse_time, user_cap
from ingest.config import load_config
from ingest.pairing import Answer, PairingConfig, normalise_prompt, rows_for_prompt

P = json.dumps([{"role": "user", "content": "How do I boil an egg?"}])


def A(rid: str, text: str, user: str = "u1", conv: str = "c1", **kw) -> Answer:  # noqa: N802
    return Answer(response_id=rid, conversation_id=conv, user_id=user, prompt_json=P, completion=text, **kw)


def summary(rows) -> list[tuple]:  # noqa: ANN001
    return sorted((r.kind, r.source, r.chosen or r.completion, r.rejected, r.label, r.weight) for r in rows)


def test_thumbs_up_beats_each_thumbs_down():
    """A up (u1), B down (u2), C down (u3) -> A>B, A>C at w_thumbs = 1.0; no KTO (all partnered)."""
    rows = rows_for_prompt([A("a", "list answer", ups=("u1",)), A("b", "prose one", user="u2", downs=("u2",)),
                            A("c", "prose two", user="u3", downs=("u3",))])
    assert summary(rows) == [("dpo", "thumbs", "list answer", "prose one", None, 1.0),
                             ("dpo", "thumbs", "list answer", "prose two", None, 1.0)]
    assert {r.owner for r in rows} == {"u1"} and rows[0].users in (("u1", "u2"), ("u1", "u3"))


def test_implicit_signals_move_weights():
    """A up + copy (+0.5) + dwell 40 s (+0.25) = +0.75; B down + abandon (-0.5).
    DPO weight = 1 + 0.75 - (-0.5) = 2.25. A is a strong positive: SFT row at 1 + 0.75 = 1.75."""
    rows = rows_for_prompt([A("a", "good", ups=("u1",), copied=True, dwell_s=40.0),
                            A("b", "bad", user="u2", downs=("u2",), abandoned=True)])
    assert summary(rows) == [("dpo", "thumbs", "good", "bad", None, 2.25), ("sft", "thumbs", "good", None, None, 1.75)]


def test_edit_makes_pair_and_sft_row():
    """A thumbed down and edited by u1: (edit > A) at w_edit 1.0, SFT(edit) at 1.0; A is paired, so no KTO."""
    rows = rows_for_prompt([A("a", "wrong answer", downs=("u1",), edit_text="- right\n- answer", editor="u1")])
    assert summary(rows) == [("dpo", "edit", "- right\n- answer", "wrong answer", None, 1.0),
                             ("sft", "edit", "- right\n- answer", None, None, 1.0)]


def test_regenerate_chain_kept_answer_beats_each_regenerated():
    """a <- b <- c (b.regenerates=a, c.regenerates=b), c thumbed up: c>a and c>b (regenerate, 1.0);
    c has no thumbs partner but is in a pair, so no KTO row."""
    rows = rows_for_prompt([A("a", "first try"), A("b", "second try", regenerates="a"),
                            A("c", "third try", regenerates="b", ups=("u1",))])
    assert summary(rows) == [("dpo", "regenerate", "third try", "first try", None, 1.0),
                             ("dpo", "regenerate", "third try", "second try", None, 1.0)]


def test_regenerate_chain_without_a_kept_answer_makes_no_pairs():
    """The chain's last answer was thumbed down: nothing was kept, so no regenerate pairs; the lone
    thumbs-down becomes an undesirable KTO row (weight 1.0)."""
    rows = rows_for_prompt([A("a", "first try"), A("b", "second try", regenerates="a", downs=("u1",))])
    assert summary(rows) == [("kto", "thumbs", "second try", None, False, 1.0)]


def test_regenerate_feedback_without_successor_means_not_kept():
    """b replaced a, then got a `regenerate` feedback whose new answer never arrived: b was not kept."""
    rows = rows_for_prompt([A("a", "first try"), A("b", "second try", regenerates="a", regenerate_feedback=True)])
    assert rows == []


def test_kto_for_unpartnered_thumbs():
    """Lone up with copy: KTO desirable at 1 + 0.5 = 1.5 and SFT strong positive at 1.5.
    Lone down with copy: undesirable at 1 - 0.5 = 0.5 (a copy makes the down vote less certain)."""
    up = rows_for_prompt([A("a", "answer", ups=("u1",), copied=True)])
    assert summary(up) == [("kto", "thumbs", "answer", None, True, 1.5), ("sft", "thumbs", "answer", None, None, 1.5)]
    down = rows_for_prompt([A("a", "answer", downs=("u1",), copied=True)])
    assert summary(down) == [("kto", "thumbs", "answer", None, False, 0.5)]


def test_same_text_up_and_down_are_not_paired():
    """Two users disagree on the same text (modulo spacing/case): no pair, two KTO rows."""
    rows = rows_for_prompt([A("a", "Same  answer", ups=("u1",)), A("b", "same answer", user="u2", downs=("u2",))])
    assert summary(rows) == [("kto", "thumbs", "Same  answer", None, True, 1.0),
                             ("kto", "thumbs", "same answer", None, False, 1.0)]


def test_net_thumb_and_pair_cap():
    """3 ups x 3 downs = 9 candidate pairs, capped at 4; an answer with 1 up and 2 downs counts as down."""
    answers = [A(f"u{i}", f"good {i}", ups=("x",)) for i in range(3)]
    answers += [A(f"d{i}", f"bad {i}", downs=("y",)) for i in range(2)] + [A("m", "mixed", ups=("p",), downs=("q", "r"))]
    rows = rows_for_prompt(answers, PairingConfig(max_thumb_pairs_per_prompt=4))
    assert len(rows) == 4 and all(r.kind == "dpo" for r in rows)
    assert rows_for_prompt(answers, PairingConfig(max_thumb_pairs_per_prompt=4)) == rows  # stable choice


def test_zero_weight_rows_are_dropped():
    """Edit of a copied answer with w_edit 0.5: 0.5 - 0.5 = 0 -> no DPO row (the SFT row stays)."""
    rows = rows_for_prompt([A("a", "x", copied=True, edit_text="y")], PairingConfig(w_edit=0.5))
    assert summary(rows) == [("sft", "edit", "y", None, None, 1.0)]


def test_normalise_prompt():
    raw = json.dumps([{"role": "system", "content": ""}, {"role": "user", "content": "  Hi   there \n  you "}])
    assert normalise_prompt(raw) == '[{"role":"user","content":"Hi there\\nyou"}]'
    assert normalise_prompt(json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])) is None


CANARIES = {
    "email": "reach me at canary.7731@example.org please",
    "phone": "call +1 415-555-0134 tonight",
    "card": "my card is 4111 1111 1111 1111 ok",
    "secret": "use sk-CANARYabcdef0123456789 as the key",
    "name": "Hello, my name is Zelda Canaryfield.",
}


@pytest.mark.parametrize("kind", sorted(CANARIES))
def test_pii_rules(kind: str):
    text, counts = pii.scrub(CANARIES[kind])
    assert counts[kind] == 1, (text, counts)
    for secret in ("canary.7731", "415-555-0134", "4111 1111", "sk-CANARY", "Zelda"):
        assert secret not in text


def test_pii_leaves_ordinary_text_alone():
    text = "In 2026 the list has 3 items: - eggs\n- water\n- salt (version 1.2.3)"
    assert pii.scrub(text) == (text, dict.fromkeys(pii.KINDS, 0))


def test_binomial_tail():
    """P[Bin(2, .5) >= 2] = .25; P[Bin(3, .5) >= 1] = 1 - 1/8 = .875; k <= 0 -> 1."""
    assert binom_sf(2, 2, 0.5) == pytest.approx(0.25)
    assert binom_sf(1, 3, 0.5) == pytest.approx(0.875)
    assert binom_sf(0, 5, 0.1) == 1.0


def test_poisoning_rule():
    """Ten honest users disagree 6 of 40 times (15%). The adversary disagrees 34 of 40:
    P[Bin(40, .15) >= 34] ~ 1e-21 < 1e-4 -> flagged. A user at 6/10 gets P[Bin(10, .15) >= 6] ~ 1.4e-3 ->
    not flagged (noisy but within chance at alpha 1e-4); "few" (5 of 5) has fewer than 8 comparisons."""
    stats = {f"h{i}": (40, 6) for i in range(10)} | {"adv": (40, 34), "noisy": (10, 6), "few": (5, 5)}
    flagged = flag_poisoners(stats, Config())
    assert list(flagged) == ["adv"]
    assert flagged["adv"]["baseline_rate"] == pytest.approx((60 + 6 + 5) / (400 + 10 + 5), abs=1e-4)


def test_user_cap():
    """counts [10, 1, 1, 1], share .5: c=3 -> 3 <= .5 * (3+1+1+1) = 3 ok; c=4 -> 4 > .5 * 7 -> cap 3.
    Ten equal users at share .25 keep everything (cap = their count)."""
    assert user_cap([10, 1, 1, 1], 0.5) == 3
    assert user_cap([5] * 10, 0.25) == 5
    assert user_cap([], 0.25) == 0


def test_window_and_cli_parsing():
    assert parse_time("2026-11-23", "start").isoformat() == "2026-11-23T00:00:00+00:00"
    assert parse_time("2026-11-23T10:00:00Z", "end").hour == 10
    with pytest.raises(ValueError, match="start is required"):
        parse_time("", "start")
    assert cli_args(["--start", "a", "--end=b", "x=1"]) == ["start=a", "end=b", "x=1"]


def test_ingest_configs_load():
    """Every ingest/configs/<job>[.<variant>].yaml loads into ingest.<job>.Config."""
    import importlib

    files = sorted((Path(__file__).resolve().parent.parent / "ingest" / "configs").glob("*.yaml"))
    assert files
    for f in files:
        job = f.name.split(".")[0]
        load_config(importlib.import_module(f"ingest.{job}").Config, f)


def test_thumb_grid_visits_every_pair_once():
    """3 ups x 3 downs with a cap above 9: all 9 (up, down) pairs, each exactly once."""
    answers = [A(f"u{i}", f"good {i}", ups=("x",)) for i in range(3)]
    answers += [A(f"d{i}", f"bad {i}", downs=("y",)) for i in range(3)]
    rows = rows_for_prompt(answers, PairingConfig(max_thumb_pairs_per_prompt=100))
    assert sorted((r.chosen, r.rejected) for r in rows) == [(f"good {i}", f"bad {j}") for i in range(3) for j in range(3)]
