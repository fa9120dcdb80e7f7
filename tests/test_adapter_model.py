"""A registered adapter is an MLflow logged model with a signature: the registry links version → logged
model → training run, `download` hands serving the same adapter bytes, and `mlflow.pyfunc.load_model`
answers with base + adapter (the same tokens as the PEFT model loaded by hand)."""

from __future__ import annotations

import json

import pytest

MODEL_NAME = "adapter-model-test"


@pytest.fixture(scope="module")
def registered(stack, tiny_model):  # noqa: ANN001, ANN201
    import mlflow
    from test_serving import tiny_adapter

    from training import registry

    folder = tiny_adapter(tiny_model, seed=7)
    registry.client()
    mlflow.set_experiment("adapter-model-tests")
    with mlflow.start_run() as run:
        ref = registry.register_adapter(folder, run.info.run_id, name=MODEL_NAME, alias="candidate",
                                        tags={"trainer": "dpo"})
    return folder, ref, run.info.run_id


def test_the_version_is_a_logged_model_of_its_run_with_the_signature(registered):
    import mlflow

    from training import registry

    _, ref, run_id = registered
    assert ref.source.startswith("models:/m-"), ref.source  # the version's source is a logged model
    logged = mlflow.get_logged_model(ref.source.removeprefix("models:/"))
    assert logged.source_run_id == run_id and logged.tags.get("flywheel.kind") == "lora-adapter"
    assert {"name": MODEL_NAME, "version": int(ref.version)} in json.loads(logged.tags["mlflow.modelVersions"])
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}@candidate")
    assert info.signature == registry.SIGNATURE
    assert {"python_function"} <= set(info.flavors)
    mv = registry.client().get_model_version(MODEL_NAME, ref.version)
    assert mv.tags["trainer"] == "dpo" and mv.tags["dataset_version"] == "test-7"  # tags + sidecar fields


def test_download_gives_serving_the_adapter_bytes(registered, tmp_path):
    from training import registry

    folder, ref, _ = registered
    got = registry.download(ref, tmp_path)
    assert got == tmp_path / MODEL_NAME / ref.version
    for name in ("adapter_config.json", "adapter_model.safetensors", "flywheel_adapter.json"):
        assert (got / name).read_bytes() == (folder / name).read_bytes(), name
    assert registry.download(ref, tmp_path) == got  # a second call reuses the folder
    assert json.loads((got / "flywheel_adapter.json").read_text())["base_model"] == "tiny"


def test_pyfunc_answers_with_base_plus_adapter(registered, tiny_model):
    import mlflow.pyfunc
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ref, _ = registered
    prompts = ["How do I boil an egg?", "Name three colours."]
    model = mlflow.pyfunc.load_model(ref.uri)
    out = model.predict(pd.DataFrame({"prompt": prompts}), params={"max_tokens": 8})
    assert list(out.columns) == ["answer"] and len(out) == 2

    tok = AutoTokenizer.from_pretrained(tiny_model)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(folder)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for prompt, answer in zip(prompts, out["answer"], strict=True):
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            by_hand = peft.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            bare = base.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        start = ids["input_ids"].shape[1]
        assert answer == tok.decode(by_hand[0, start:], skip_special_tokens=True)
        assert not torch.equal(by_hand[0, start:], bare[0, start:]), "the adapter changed nothing: test is void"
