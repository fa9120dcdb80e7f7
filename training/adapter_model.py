"""The registered form of an adapter: an MLflow logged model (pyfunc flavour, "models from code").

`training.registry.register_adapter` logs each adapter folder with this file as its model code, a
signature (`registry.SIGNATURE`: a `prompt` string in, an `answer` string out; `max_tokens` and
`temperature` as params) and the adapter as the model's artifact `adapter`. Serving never runs this: it downloads the folder and
loads it into its own engine. This is for everyone else, who can answer with any version in two lines:

    model = mlflow.pyfunc.load_model("models:/flywheel-assistant@champion")
    model.predict(pd.DataFrame({"prompt": ["How do I boil an egg?"]}), params={"max_tokens": 64})

The base model is the one the adapter's sidecar names (`base_model`, resolved as the jobs resolve it,
else `base_model_path`). Heavy imports happen in `load_context`, so logging the model loads nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


def base_model_of(sidecar: dict[str, Any]) -> str:
    """The base model to load under the adapter: the sidecar's name where this install resolves it,
    else the path it was trained from."""
    try:
        from ingest import endpoints
    except ImportError:  # loaded outside a Flywheel install
        return sidecar["base_model_path"]
    try:
        return endpoints.model_path(sidecar["base_model"])
    except endpoints.ModelNotFound:
        return sidecar["base_model_path"]


class AdapterModel(PythonModel):
    """Base model + LoRA adapter; answers each prompt as a one-turn chat."""

    def load_context(self, context: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        adapter = Path(context.artifacts["adapter"])
        sidecar = json.loads((adapter / "flywheel_adapter.json").read_text())
        base = base_model_of(sidecar)
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.tokenizer.padding_side = "left"  # batched decoding needs left padding
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        self.model = PeftModel.from_pretrained(model, str(adapter)).eval()

    # No type hints on the inputs: MLflow would try to derive a signature from them; the logged one says it.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import pandas as pd
        import torch

        params = {"max_tokens": 128, "temperature": 0.0, **(params or {})}
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True)
                 for p in model_input["prompt"].astype(str)]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sample = float(params["temperature"]) > 0
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=int(params["max_tokens"]), do_sample=sample,
                                      temperature=float(params["temperature"]) if sample else None,
                                      top_p=None, top_k=None, pad_token_id=self.tokenizer.pad_token_id)
        answers = self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return pd.DataFrame({"answer": answers})


mlflow.models.set_model(AdapterModel())
