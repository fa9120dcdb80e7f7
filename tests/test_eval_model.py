"""The suite's model plumbing on the tiny model: batched left-padded log-probs and KL equal an unbatched,
unpadded computation; the same seed gives the same answers; the base side ignores the adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from training.evaluate import Config, Policies


@pytest.fixture(scope="module")
def pol(tiny_model, tmp_path_factory) -> Iterator[Policies]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                       LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("rand-adapter")
    m.save_pretrained(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_eval_tiny: 2 threads on an oversubscribed CPU are ~10x slower
    yield Policies(tiny_model, {"cand": folder}, "float32")
    torch.set_num_threads(threads)


PROMPTS = [[{"role": "user", "content": "Any tips for tea?"}],
           [{"role": "user", "content": "What is hard about chess when you start playing it?"}]]


def _direct_logprob(pol: Policies, adapter, messages, completion: str) -> float:  # noqa: ANN001
    p = pol._prompt_ids(messages)
    c = pol.tok(completion, add_special_tokens=False)["input_ids"] + [pol.eos]
    with pol.use(adapter) as model, torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0]
    lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
    return lp.gather(-1, torch.tensor(c)[:, None]).sum().item()


def test_batched_logprobs_match_unpadded(pol):
    comps = ["With tea, practice a little every day.", "Here are some tips for chess:\n- Start with the basics."]
    for adapter in ("cand", None):
        got = pol.completion_logprobs(adapter, PROMPTS, comps, batch_size=2)
        want = [_direct_logprob(pol, adapter, m, c) for m, c in zip(PROMPTS, comps, strict=True)]
        assert got.tolist() == pytest.approx(want, abs=1e-3)
    # The adapter changes the model (random non-zero LoRA), the base side does not see it.
    assert pol.completion_logprobs("cand", PROMPTS, comps, 2)[0] != pytest.approx(
        pol.completion_logprobs(None, PROMPTS, comps, 2)[0], abs=1e-3)


def test_generation_is_seeded_and_kl_matches_direct(pol):
    cfg = Config(max_new_tokens=12, batch_size=2, temperature=1.0, top_p=1.0, seed=3)
    a = pol.generate("cand", PROMPTS, cfg, "t")
    assert [x["text"] for x in a] == [x["text"] for x in pol.generate("cand", PROMPTS, cfg, "t")]
    assert all(pol.eos not in x["ids"] for x in a)  # cut at the first eos
    kl = pol.kl_to_base("cand", PROMPTS, a, batch_size=2)
    # Direct: unpadded, one answer at a time, KL over the positions that predict the answer's tokens.
    for m, x, got in zip(PROMPTS, a, kl, strict=True):
        ids = x["ids"] + ([] if x["truncated"] else [pol.eos])
        seq = torch.tensor([pol._prompt_ids(m) + ids])
        with torch.no_grad():
            with pol.use("cand") as model:
                lc = torch.log_softmax(model(input_ids=seq).logits[0, -len(ids) - 1:-1], -1)
            with pol.use(None) as model:
                lb = torch.log_softmax(model(input_ids=seq).logits[0, -len(ids) - 1:-1], -1)
        want = (lc.exp() * (lc - lb)).sum(-1).mean().item()
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5) and got > 0
    json.dumps(a)  # answers are plain data (they go into samples.jsonl)


def test_reward_model_judge_scores_with_training_reward_model(tmp_path):
    """The rm judge goes through training.reward_model.load_scorer (a MiniLM score head, untrained here:
    the test pins the plumbing, not the preference). A local folder: no registry is touched."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ingest import endpoints
    from training import judges

    torch.set_num_threads(1)
    path = endpoints.minilm_path()
    AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    (tmp_path / "flywheel_adapter.json").write_text(json.dumps({"input_format": "pair", "max_length": 64}))
    judge = judges.make_judge(f"rm:{tmp_path}")
    scores = judge.score(PROMPTS, ["- a list\n- of tips", "plain prose"])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores) and scores[0] != scores[1]
    assert judge.score(PROMPTS, ["- a list\n- of tips", "plain prose"]) == scores
