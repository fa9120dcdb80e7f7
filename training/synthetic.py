"""A fabricated preference dataset in the shared Parquet layout, for training tests and benchmarks.

The preference is "answers as a bullet list": the tiny model writes lists for about a quarter of its
answers (infra/models.py), so the preference is learnable and visible. Rows follow the contract
exactly (datasets/<kind>/version=V/split=S/part-0.parquet + manifests/V.json), so the jobs read them
the same way they read a dataset built by ingest.
"""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["python", "tea", "bicycles", "sleep", "gardening", "budgets", "running", "photography", "rust",
          "baking", "chess", "maps", "rivers", "memory", "music", "painting", "email", "cooking", "hiking",
          "databases", "kafka", "spark", "weather", "trains", "birds", "coffee", "reading", "writing"]
QUESTIONS = ["How do I get started with {t}?", "What should I know about {t}?", "Any tips for {t}?",
             "Explain {t} briefly.", "Why do people like {t}?", "What is hard about {t}?"]
FACTS = ["practice a little every day", "start with the basics", "keep notes of what works",
         "ask someone with experience", "take breaks often", "measure before you change things",
         "read the manual first", "try small experiments", "be patient with yourself", "clean up as you go"]


def list_answer(topic: str, facts: list[str]) -> str:
    return f"Here are some tips for {topic}:\n" + "\n".join(f"- {f.capitalize()}." for f in facts)


def prose_answer(topic: str, facts: list[str]) -> str:
    return f"With {topic}, " + ", and ".join(facts) + "."


def _prompts(n: int, topics: list[str], rng: random.Random) -> list[tuple[str, str]]:
    return [(topic, rng.choice(QUESTIONS).format(t=topic)) for topic in (rng.choice(topics) for _ in range(n))]


def preference_rows(n: int, topics: list[str], seed: int, split: str) -> dict[str, list[dict]]:
    """n DPO pairs (chosen = list, rejected = prose) plus the matching KTO and SFT rows."""
    rng = random.Random(seed)
    dpo, kto, sft = [], [], []
    for i, (topic, question) in enumerate(_prompts(n, topics, rng)):
        facts = rng.sample(FACTS, rng.randint(2, 3))
        prompt_id = f"{split}-{seed}-{i:05d}"
        prompt_json = json.dumps([{"role": "user", "content": question}])
        chosen, rejected = list_answer(topic, facts), prose_answer(topic, facts)
        weight = rng.choice([0.5, 1.0, 1.0, 2.0])
        source = rng.choice(["thumbs", "edit", "regenerate", "implicit"])
        dpo.append({"prompt_id": prompt_id, "prompt_json": prompt_json, "chosen": chosen, "rejected": rejected,
                    "weight": weight, "source": source})
        kto.append({"prompt_id": prompt_id, "prompt_json": prompt_json, "completion": chosen, "label": True,
                    "weight": weight, "source": source})
        kto.append({"prompt_id": prompt_id + "u", "prompt_json": prompt_json, "completion": rejected,
                    "label": False, "weight": weight, "source": source})
        sft.append({"prompt_id": prompt_id, "prompt_json": prompt_json, "completion": chosen, "weight": weight,
                    "source": source})
    return {"dpo": dpo, "kto": kto, "sft": sft}


SCHEMAS = {
    "dpo": pa.schema([("prompt_id", pa.string()), ("prompt_json", pa.string()), ("chosen", pa.string()),
                      ("rejected", pa.string()), ("weight", pa.float64()), ("source", pa.string())]),
    "kto": pa.schema([("prompt_id", pa.string()), ("prompt_json", pa.string()), ("completion", pa.string()),
                      ("label", pa.bool_()), ("weight", pa.float64()), ("source", pa.string())]),
    "sft": pa.schema([("prompt_id", pa.string()), ("prompt_json", pa.string()), ("completion", pa.string()),
                      ("weight", pa.float64()), ("source", pa.string())]),
}


def write_rows(root: Path, version: str, kind: str, split: str, rows: list[dict]) -> Path:
    folder = root / kind / f"version={version}" / f"split={split}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "part-0.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMAS[kind]), path)
    return path


def write_dataset(root: Path, version: str, n_train: int = 48, n_eval: int = 16, seed: int = 0,
                  kinds: tuple[str, ...] = ("dpo", "kto", "sft")) -> dict:
    """Write a dataset version under `root` (= var/datasets); held-out prompts use unseen topics.

    Name versions `ds-...` like ingest does, so `ingest.reader.latest_version` sees them."""
    train_topics, eval_topics = TOPICS[:20], TOPICS[20:]
    splits = {"train": preference_rows(n_train, train_topics, seed, "train"),
              "eval": preference_rows(n_eval, eval_topics, seed + 1, "eval")}
    counts: dict[str, dict[str, int]] = {}
    digest = hashlib.sha256()
    for split, by_kind in splits.items():
        for kind in kinds:
            write_rows(root, version, kind, split, by_kind[kind])
            counts.setdefault(kind, {})[split] = len(by_kind[kind])
            digest.update(json.dumps(by_kind[kind], sort_keys=True).encode())
    for kind in ("dpo", "kto", "sft"):
        counts.setdefault(kind, {"train": 0, "eval": 0})
    manifest = {"version": version, "counts": counts, "rows": sum(sum(c.values()) for c in counts.values()),
                "filters": {}, "sha256": digest.hexdigest(), "trainable": True,
                "source_window": {"synthetic": True, "seed": seed}, "created_at": datetime.now(UTC).isoformat()}
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    (root / "manifests" / f"{version}.json").write_text(json.dumps(manifest, indent=2))
    return manifest
