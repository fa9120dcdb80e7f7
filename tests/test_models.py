"""Base-model provisioning: the tiny model is quick and deterministic; bad paths explain the fix."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from infra import models
from ingest import endpoints
from ingest.endpoints import ModelNotFound

REPO = Path(__file__).resolve().parent.parent


def test_tiny_model_builds_quickly_and_deterministically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tiny_model: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FLYWHEEL_VAR", str(tmp_path))
    t0 = time.monotonic()
    out = models.build_tiny(seed=0, force=True)
    assert time.monotonic() - t0 < 60
    ours = json.loads((out / "provenance.json").read_text())
    reference = json.loads((Path(tiny_model) / "provenance.json").read_text())
    assert ours["files_sha256"] == reference["files_sha256"], "same seed must give the same files"
    assert 1e6 < ours["params"] < 10e6

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.eos_token == tok.pad_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Any tips for tea?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    gen = model.generate(**prompt, max_new_tokens=40, do_sample=False)
    text = tok.decode(gen[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    # ~3M params and 120 steps learn the corpus's answer shapes, not much topic knowledge.
    assert text.startswith(("With ", "Here are")), f"the tiny model should answer in the corpus's shape: {text!r}"
    # A cached build is a no-op.
    t0 = time.monotonic()
    models.build_tiny(seed=0)
    assert time.monotonic() - t0 < 1


def test_model_path_errors_say_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLYWHEEL_VAR", str(tmp_path))
    with pytest.raises(ModelNotFound, match="run `make models`"):
        endpoints.model_path("smollm2")
    with pytest.raises(ModelNotFound, match="does not exist"):
        endpoints.model_path(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="no config.json"):
        endpoints.model_path(str(tmp_path / "empty"))
    assert endpoints.model_path("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert (Path(endpoints.model_path("minilm")) / "config.json").is_file()


def test_minilm_loads_as_a_reward_backbone():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = endpoints.model_path("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(path)
    score = model(**tok(["a question", "another"], ["an answer", "x"], return_tensors="pt", padding=True)).logits
    assert score.shape == (2, 1)


@pytest.mark.slow
def test_smollm2_converts_and_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """GGUF -> safetensors once (~25 s), then a chat answer that is English about the question."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    repo_copy = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
    if (repo_copy / "provenance.json").is_file():
        out = repo_copy  # converted by `make models` already; conversion itself is checked by its provenance
        prov = json.loads((out / "provenance.json").read_text())
        assert prov["gguf_sha256"] == models.sha256_file(models.smollm2_gguf())
    else:
        monkeypatch.setenv("FLYWHEEL_VAR", str(tmp_path))
        out = models.provision_smollm2()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    gen = model.generate(**enc, max_new_tokens=30, do_sample=False)
    text = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "paris" in text.lower(), text
