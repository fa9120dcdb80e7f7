"""Pure pieces of serving, no stack: feedback tokens, API keys, rate limits, idempotency store, A/B split,
adapter names, every serving config file, and the engine's batched decoding on the tiny model."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ingest.config import load_config
from serving.feedback import LRU, ApiKeys, FeedbackClaims, FeedbackTokens, RateLimiter, TokenError

REPO = Path(__file__).resolve().parent.parent


def test_token_carries_its_claims_and_only_accepted_secrets_verify():
    """A token round-trips every claim; any change to it, a secret not in the list, or the clock past
    `expires` refuses it (401 / 410); the first secret signs and the others still verify (rotation)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    ids = st.text(alphabet="abcXYZ019_.:@/-", min_size=1, max_size=40)
    claims = st.builds(FeedbackClaims, ids, ids, ids, st.none() | ids, st.integers(0, 2**40), st.none() | ids)

    @settings(max_examples=200, deadline=None, database=None)
    @given(c=claims, flip=st.integers(0, 10_000), junk=st.text(max_size=30))
    def prop(c: FeedbackClaims, flip: int, junk: str) -> None:
        tokens = FeedbackTokens([b"new", b"old"])
        token = tokens.issue(c)
        assert tokens.verify(token, now=c.expires) == c
        assert FeedbackTokens([b"old"]).verify(FeedbackTokens([b"old"]).issue(c), now=0) == c
        assert tokens.verify(FeedbackTokens([b"old"]).issue(c), now=0) == c  # still accepted while rotating
        i = flip % len(token)
        altered = token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1:]
        # The last character of a base64 segment carries unused bits: changing only those decodes to the
        # same bytes, which is the same token, not a forgery.
        same_bytes = i + 1 == len(token) or token[i + 1] == "."
        for bad in (altered, junk, token + junk if junk else token + "x"):
            if bad == token or (bad is altered and same_bytes):
                continue
            with pytest.raises(TokenError) as e:
                tokens.verify(bad, now=0)
            assert e.value.status == 401
        with pytest.raises(TokenError) as e:
            FeedbackTokens([b"old"]).verify(token, now=0)  # signed with "new", which "old"-only does not know
        assert e.value.status == 401
        with pytest.raises(TokenError) as e:
            tokens.verify(token, now=c.expires + 1)
        assert e.value.status == 410

    prop()


def test_api_keys_are_kept_as_digests_and_map_to_tenants():
    keys = ApiKeys(["k1:app-one", f"sha256-{hashlib.sha256(b'k2').hexdigest()}:app-two"])
    assert keys.required and not ApiKeys([]).required
    assert (keys.tenant("k1"), keys.tenant("k2"), keys.tenant("k3"), keys.tenant("²")) == ("app-one", "app-two",
                                                                                             None, None)
    assert "k1" not in repr(vars(keys))  # only digests are held
    with pytest.raises(ValueError, match="key:tenant"):
        ApiKeys(["no-tenant-here"])


def test_rate_limiter_token_bucket():
    """60/min = 1 token/s, burst 3: three at t=0 pass, the 4th fails; at t=1 one more passes."""
    rl = RateLimiter(per_minute=60, burst=3)
    assert [rl.allow("a", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", now=0.0)  # per user
    assert rl.allow("a", now=1.0) and not rl.allow("a", now=1.0)
    assert all(RateLimiter(0, 1).allow("a") for _ in range(100))  # 0 = unlimited
    assert rl.has_room("b", now=1.0) and not rl.has_room("a", now=1.0)  # has_room takes nothing
    assert rl.has_room("a", now=2.0) and rl.allow("a", now=2.0)


def test_lru_setdefault_is_first_writer_wins():
    lru = LRU(2)
    assert lru.setdefault("e1", "first") == "first"
    assert lru.setdefault("e1", "second") == "first"
    lru.put("e2", 2)
    lru.put("e3", 3)
    assert lru.get("e1") is None and len(lru) == 2


def test_ab_split_is_sticky_and_proportional():
    from serving.adapters import AdapterRouter

    router = AdapterRouter(backend=None, base_model="tiny", model_name="m", adapters_dir=Path("/tmp"),
                           challenger_share=0.25)
    users = [f"user-{i}" for i in range(4000)]
    share = sum(router._in_challenger_share(u) for u in users) / len(users)
    assert 0.22 < share < 0.28
    # Sticky across replicas and restarts: the arm is a function of the user id alone (sha256), not of the
    # router instance or the process (Python's hash() is salted per process). Pinned, because changing the
    # hash would move users between arms in the middle of a canary and mix the arms' feedback.
    pinned = "0000000101000011100101000100100001000000"
    assert "".join("1" if router._in_challenger_share(f"user-{i}") else "0" for i in range(40)) == pinned
    # Widening the share only moves users in: nobody who saw the challenger is sent back to the champion.
    wider = AdapterRouter(backend=None, base_model="tiny", model_name="m", adapters_dir=Path("/tmp"),
                          challenger_share=0.5)
    inside = [u for u in users if router._in_challenger_share(u)]
    assert all(wider._in_challenger_share(u) for u in inside)
    assert sum(wider._in_challenger_share(u) for u in users) > len(inside) + 500


def test_adapter_names_carry_the_version():
    from serving.engine import adapter_name

    assert adapter_name("flywheel-assistant/3") == "flywheel-assistant_3"
    assert adapter_name("flywheel-assistant/3") != adapter_name("flywheel-assistant/13")
    assert "." not in adapter_name("a.b/1")  # PEFT ModuleDict keys may not hold dots


@pytest.mark.parametrize("path", sorted((REPO / "serving" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_files_load(path):
    from serving.serve import Config

    assert path.read_text().startswith("# python -m serving --config")
    cfg = load_config(Config, path)
    assert cfg.http.host == "127.0.0.1"


def test_engine_batches_equal_single_requests(tiny_model):
    """Greedy answers are the same alone and in a batch of mixed lengths (left padding, positions,
    dropping finished rows from the KV cache), and log-probs agree to bf16 precision."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from transformers import AutoModelForCausalLM

    from serving.engine import Engine

    engine = Engine(tiny_model, max_batch=8, max_wait_ms=50, threads=1)
    try:
        prompts = [[{"role": "user", "content": "tell me " + "more " * k}] for k in range(5)]
        alone = [engine.generate(p, max_tokens=12) for p in prompts]
        with ThreadPoolExecutor(5) as ex:
            together = list(ex.map(lambda p: engine.generate(p, max_tokens=12), prompts))
        assert engine.stats["max_batch_seen"] > 1
        for a, b in zip(alone, together, strict=True):
            assert a.text == b.text and a.finish_reason == b.finish_reason
            assert a.logprob == pytest.approx(b.logprob, abs=0.1)
        # The summed log-prob is the model's own, teacher-forced on prompt + answer (+ eos on "stop"), in
        # fp32 here against the engine's dtype (bf16 on a bf16 CPU: ~0.07 apart over 12 tokens).
        reference = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        eos = next(iter(engine.eos_ids))
        for p, a in zip(prompts, alone, strict=True):
            ids = engine.encode(p, 12)
            answer = [*a.token_ids, *([eos] if a.finish_reason == "stop" else [])]
            with torch.no_grad():
                logp = torch.log_softmax(reference(torch.tensor([ids + answer])).logits[0, :-1].float(), dim=-1)
            want = sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(answer))
            assert a.logprob == pytest.approx(want, rel=0.02, abs=0.05), (a.logprob, want)
        s1 = engine.generate(prompts[0], max_tokens=12, temperature=1.0, seed=5)
        s2 = engine.generate(prompts[0], max_tokens=12, temperature=1.0, seed=5)
        assert s1.text == s2.text  # a seed reproduces a sampled answer
    finally:
        engine.close()


def test_requests_join_a_running_batch(tiny_model):
    """Continuous batching: requests queued while a long answer decodes join its batch (prefilled,
    cache left-padded), finish before it, and get the same greedy answers as alone."""
    import threading

    from serving.engine import Engine

    engine = Engine(tiny_model, max_batch=8, max_wait_ms=0, threads=1)
    try:
        long_prompt = [{"role": "user", "content": "tell me a long story"}]
        shorts = [[{"role": "user", "content": "hi " + "there " * k}] for k in range(4)]
        alone = [engine.generate(p, max_tokens=6) for p in shorts]
        # eos ignored: greedy, the tiny model ends this answer after 8 tokens, too short for anyone to join.
        long_alone = engine.start(long_prompt, 80, 0.0, 1.0, None, None, ignore_eos=True).result(timeout=60)
        assert long_alone.completion_tokens == 80 and long_alone.finish_reason == "length"

        first_token = threading.Event()
        done_order: list[str] = []
        long_fut = engine.start(long_prompt, 80, 0.0, 1.0, None, None, on_delta=lambda _t: first_token.set(),
                                ignore_eos=True)
        long_fut.add_done_callback(lambda _f: done_order.append("long"))
        assert first_token.wait(30)
        futs = []
        for p in shorts:
            f = engine.start(p, 6, 0.0, 1.0, None, None)
            f.add_done_callback(lambda _f: done_order.append("short"))
            futs.append(f)
        joined = [f.result(timeout=60) for f in futs]
        assert long_fut.result(timeout=60).text == long_alone.text
        assert engine.stats["joined"] >= 1, engine.stats
        assert done_order[-1] == "long", done_order  # the short ones did not wait for the long one
        for a, b in zip(alone, joined, strict=True):
            assert a.text == b.text and a.finish_reason == b.finish_reason
            assert a.logprob == pytest.approx(b.logprob, abs=0.1)
    finally:
        engine.close()


def test_multi_lora_matches_peft(tiny_model):
    """Logits of a mixed batch (base, adapter 1, adapter 2 rows) through serving.lora equal PEFT's
    for each row's adapter alone (fp32), including a rank-padded adapter and after an unload."""
    import sys

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serving.lora import MultiLora

    sys.path.insert(0, str(Path(__file__).parent))
    from test_serving import tiny_adapter

    a1, a2 = tiny_adapter(tiny_model, 1), tiny_adapter(tiny_model, 2)
    ids = torch.randint(3, 500, (3, 9))
    with torch.inference_mode():
        base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        want_base = base(ids[:1]).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), a1, adapter_name="a1")
        peft.load_adapter(a2, adapter_name="a2")
        peft.eval()
        peft.set_adapter("a1")
        want_1 = peft(ids[1:2]).logits
        peft.set_adapter("a2")
        want_2 = peft(ids[2:3]).logits
        lora = MultiLora(base)
        lora.load("a1", a1)
        lora.load("a2", a2)
        lora.select([None, "a1", "a2"], torch.device("cpu"))
        got = base(ids).logits
        assert torch.allclose(got[0], want_base[0], atol=1e-4)
        assert torch.allclose(got[1], want_1[0], atol=1e-4)
        assert torch.allclose(got[2], want_2[0], atol=1e-4)
        assert not torch.allclose(want_1, want_2, atol=1e-2)  # the adapters really differ
        lora.select(["a2"] * 3, torch.device("cpu"))  # the one-adapter fast path
        assert torch.allclose(base(ids[2:3]).logits, want_2, atol=1e-4)
        lora.unload("a1")
        lora.select([None], torch.device("cpu"))
        assert torch.allclose(base(ids[:1]).logits, want_base, atol=1e-4)


def test_merged_hot_adapter_matches_gathered_path(tiny_model):
    """With the hot adapter merged (fp32 merge, cast), an all-hot batch gives the same logits as the
    unmerged path, and the base rows are untouched."""
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    from serving.lora import MultiLora

    sys.path.insert(0, str(Path(__file__).parent))
    from test_serving import tiny_adapter

    ids = torch.randint(3, 500, (2, 7))
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
        lora = MultiLora(model)
        lora.load("a1", tiny_adapter(tiny_model, 1))
        lora.select(["a1", "a1"], torch.device("cpu"))
        unmerged = model(ids).logits
        lora.merge("a1")
        assert torch.allclose(model(ids).logits, unmerged, atol=1e-4)
        lora.select([None, "a1"], torch.device("cpu"))  # mixed batch: gathered path, still exact
        mixed = model(ids).logits
        assert torch.allclose(mixed[1], unmerged[1], atol=1e-4)
        lora.merge(None)
        lora.select([None, None], torch.device("cpu"))
        assert torch.allclose(model(ids).logits[0], mixed[0], atol=1e-4)


def test_nucleus_sampling_from_topk_equals_full_sort():
    """The top-256 shortcut draws the same token as sorting the whole vocabulary, for peaky
    distributions (nucleus inside the top 256) and flat ones (fallback to the full sort)."""
    import torch

    from serving.engine import Engine

    def full_sort(logp: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
        probs = torch.softmax(logp / temperature, dim=-1)
        sorted_p, order = torch.sort(probs, descending=True)
        cut = int(torch.searchsorted(torch.cumsum(sorted_p, -1), torch.tensor(top_p))) + 1
        sorted_p = sorted_p[:cut]
        return int(order[int(torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen))])

    torch.manual_seed(0)
    for scale in (8.0, 0.5):  # peaky: top 256 hold > 0.95 of the mass; flat: they do not
        logp = torch.log_softmax(torch.randn(20, 49152) * scale, dim=-1)
        for j in range(20):
            got = Engine._sample(logp[j], 0.7, 0.95, torch.Generator().manual_seed(j))
            want = full_sort(logp[j], 0.7, 0.95, torch.Generator().manual_seed(j))
            assert got == want, (scale, j)
