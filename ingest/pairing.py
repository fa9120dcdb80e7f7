"""Pairing rules: the answers given to one prompt, with the feedback they got -> training rows.

Pure Python, no Spark: the dataset builder groups answers by prompt in Spark and calls
`rows_for_prompt` on each group, and the tests call it on hand-built sequences.

The prompt is the *normalised conversation*: the messages before the answer, whitespace collapsed
per line, as canonical JSON (`prompt_key`). Answers to the same prompt_key are compared with each other.

Rules (all values configurable through `PairingConfig`, defaults in brackets):
1. **Edit**: an answer the user edited gives DPO (edited_text > original), source "edit", and an SFT
   row with the edited text. Weight `w_edit` [1.0] minus the implicit signals of the original.
2. **Regenerate chain**: answers linked by `regenerates` (B.regenerates = A) form a chain. Every answer
   that was regenerated away (it has a successor, or got a `regenerate` feedback) loses to the chain's
   last answer -- the one the user kept -- if that one was not itself regenerated away and not thumbed
   down. Source "regenerate", weight `w_regenerate` [1.0] + implicit(kept) - implicit(regenerated).
3. **Thumbs**: every thumbed-up answer beats every thumbed-down answer of the same prompt (answers
   with the same normalised text are not paired). At most `max_thumb_pairs_per_prompt` [8] per prompt,
   spread over the answers in an order fixed by a hash of their ids. Source "thumbs", weight `w_thumbs` [1.0] + implicit(up) - implicit(down).
   An answer's thumb is its net vote: ups minus downs over distinct users (each user's last vote).
4. **KTO**: a thumbed answer that is in no DPO pair gives one KTO row: label = thumb up; weight
   `w_kto` [1.0] + implicit (desirable) or - implicit (undesirable).
5. **SFT**: edits (rule 1) and strong positives: thumbed up and copied or dwelled >= `long_dwell_s`
   [30 s]. Weight `w_sft` [1.0] (+ implicit for strong positives). Source "edit" / "thumbs".
Implicit signals of one answer: copy `copy_bonus` [+0.5], dwell >= long_dwell_s `dwell_bonus` [+0.25],
abandon `abandon_penalty` [-0.5]. Weights are clamped at 0 and rows of weight 0 dropped.

Each row names an `owner` (the user whose action made it: editor, the chain's user, the up-voter,
the rater) for per-user caps, and `users` (everyone whose signal it uses) for the poisoning filter.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

SOURCES = ("thumbs", "edit", "regenerate", "implicit")


@dataclass
class PairingConfig:
    """Pairing rules and implicit-signal weights (see the module docstring for what each does)."""

    w_edit: float = 1.0
    w_regenerate: float = 1.0
    w_thumbs: float = 1.0
    w_kto: float = 1.0
    w_sft: float = 1.0
    copy_bonus: float = 0.5
    dwell_bonus: float = 0.25
    long_dwell_s: float = 30.0
    abandon_penalty: float = -0.5
    max_thumb_pairs_per_prompt: int = 8
    sft_strong_positives: bool = True


@dataclass(frozen=True)
class Answer:
    """One response plus the feedback it got (aggregated per response by the builder)."""

    response_id: str
    conversation_id: str
    user_id: str
    prompt_json: str  # normalised messages (see normalise_prompt)
    completion: str
    regenerates: str | None = None
    ups: tuple[str, ...] = ()  # users whose last vote on it was thumbs_up
    downs: tuple[str, ...] = ()
    edit_text: str | None = None
    editor: str | None = None
    copied: bool = False
    dwell_s: float | None = None
    abandoned: bool = False
    regenerate_feedback: bool = False

    @property
    def thumb(self) -> int:
        net = len(self.ups) - len(self.downs)
        return (net > 0) - (net < 0)


@dataclass(frozen=True)
class Row:
    kind: str  # dpo | kto | sft
    prompt_id: str
    prompt_json: str
    source: str
    weight: float
    owner: str
    users: tuple[str, ...]
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: bool | None = None
    response_ids: tuple[str, ...] = field(default=())


_SPACES = re.compile(r"[ \t\r\f\v]+")


def normalise_text(text: str) -> str:
    """Collapse runs of spaces per line and trim; keeps line breaks (lists are made of lines)."""
    lines = [_SPACES.sub(" ", line).strip() for line in text.strip().split("\n")]
    return "\n".join(lines)


def normalise_prompt(prompt_json: str) -> str | None:
    """Canonical JSON of the conversation before the answer, or None if it does not end with a user turn."""
    messages = json.loads(prompt_json)
    out = [{"role": m["role"], "content": normalise_text(m["content"])} for m in messages]
    out = [m for m in out if not (m["role"] == "system" and not m["content"])]
    if not out or out[-1]["role"] != "user":
        return None
    return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def prompt_id(prompt_key: str) -> str:
    return hashlib.sha256(prompt_key.encode()).hexdigest()[:16]


def near_key(text: str) -> str:
    """The near-duplicate key of a text: lower case, letters and digits only, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def implicit(a: Answer, cfg: PairingConfig) -> float:
    bonus = 0.0
    if a.copied:
        bonus += cfg.copy_bonus
    if a.dwell_s is not None and a.dwell_s >= cfg.long_dwell_s:
        bonus += cfg.dwell_bonus
    if a.abandoned:
        bonus += cfg.abandon_penalty
    return bonus


def _stable(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


def _chains(answers: list[Answer]) -> list[list[Answer]]:
    """Regenerate chains (connected by `regenerates`), each in order root -> last."""
    by_id = {a.response_id: a for a in answers}
    successor = {a.regenerates: a.response_id for a in answers if a.regenerates in by_id}
    roots = [a for a in answers if a.regenerates not in by_id]
    chains = []
    for root in sorted(roots, key=lambda a: a.response_id):
        chain, node, seen = [root], root.response_id, {root.response_id}
        while node in successor and successor[node] not in seen:
            node = successor[node]
            seen.add(node)
            chain.append(by_id[node])
        if len(chain) > 1 or root.regenerate_feedback:
            chains.append(chain)
    return chains


class _Rows:
    """The rows of one prompt as the rules add them, and which answers a DPO pair has used."""

    def __init__(self, prompt_json: str) -> None:
        self.pkey, self.pid = prompt_json, prompt_id(prompt_json)
        self.rows: list[Row] = []
        self.paired: set[str] = set()

    def add(self, kind: str, source: str, weight: float, owner: str, users: tuple[str, ...], **fields) -> None:  # noqa: ANN003
        self.rows.append(Row(kind, self.pid, self.pkey, source, round(weight, 6), owner, users, **fields))

    def dpo(self, chosen: str, rejected: str, source: str, weight: float, owner: str, users: set[str],
            ids: tuple[str, ...]) -> bool:
        """A pair, unless its weight is not positive or its two answers are near-duplicates."""
        if weight <= 0 or near_key(chosen) == near_key(rejected):
            return False
        self.add("dpo", source, weight, owner, tuple(sorted(users)), chosen=chosen, rejected=rejected, response_ids=ids)
        self.paired.update(i for i in ids if i)
        return True


def _edits(out: _Rows, answers: list[Answer], cfg: PairingConfig) -> None:
    """Rule 1: an edited answer gives DPO (edit > original) and an SFT row of the edit."""
    for a in answers:
        if a.edit_text:
            editor = a.editor or a.user_id
            out.dpo(a.edit_text, a.completion, "edit", cfg.w_edit - implicit(a, cfg), editor, {editor},
                    ("", a.response_id))
            if cfg.w_sft > 0:
                out.add("sft", "edit", cfg.w_sft, editor, (editor,), completion=a.edit_text,
                        response_ids=(a.response_id,))


def _regenerations(out: _Rows, answers: list[Answer], cfg: PairingConfig) -> None:
    """Rule 2: the answer a user kept after regenerating beats every answer it replaced."""
    for chain in _chains(answers):
        last = chain[-1]
        if last.regenerate_feedback or last.thumb < 0:
            continue
        for lost in chain[:-1]:
            out.dpo(last.completion, lost.completion, "regenerate",
                    cfg.w_regenerate + implicit(last, cfg) - implicit(lost, cfg), last.user_id, {last.user_id},
                    (last.response_id, lost.response_id))


def _thumb_pairs(out: _Rows, answers: list[Answer], cfg: PairingConfig) -> None:
    """Rule 3: thumbs up vs thumbs down, at most max_thumb_pairs_per_prompt pairs."""
    ups = sorted((a for a in answers if a.thumb > 0), key=lambda a: _stable(a.response_id))
    downs = sorted((a for a in answers if a.thumb < 0), key=lambda a: _stable(a.response_id))
    made = 0
    # Walk the up x down grid in "diagonals" (k -> up k % nu, down (k // nu + k % nu) % nd visits every
    # cell once), so the first pairs spread over many answers and a popular prompt costs O(max pairs),
    # not O(ups * downs).
    nu, nd = len(ups), len(downs)
    for k in range(min(nu * nd, 4 * cfg.max_thumb_pairs_per_prompt + nu + nd)):
        if made >= cfg.max_thumb_pairs_per_prompt:
            break
        u, d = ups[k % nu], downs[(k // nu + k % nu) % nd]
        made += out.dpo(u.completion, d.completion, "thumbs", cfg.w_thumbs + implicit(u, cfg) - implicit(d, cfg),
                        min(u.ups), set(u.ups) | set(d.downs), (u.response_id, d.response_id))


def _unpaired_and_strong(out: _Rows, answers: list[Answer], cfg: PairingConfig) -> None:
    """Rule 4: KTO for thumbed answers no pair used; rule 5: SFT from strong positives (thumbed up and
    copied, or read for at least long_dwell_s)."""
    for a in answers:
        if a.thumb != 0 and a.response_id not in out.paired:
            desirable = a.thumb > 0
            w = cfg.w_kto + (implicit(a, cfg) if desirable else -implicit(a, cfg))
            if w > 0:
                out.add("kto", "thumbs", w, min(a.ups if desirable else a.downs),
                        tuple(sorted(set(a.ups) | set(a.downs))), completion=a.completion, label=desirable,
                        response_ids=(a.response_id,))
        strong = a.thumb > 0 and (a.copied or (a.dwell_s is not None and a.dwell_s >= cfg.long_dwell_s))
        if cfg.sft_strong_positives and strong:
            out.add("sft", "thumbs", cfg.w_sft + implicit(a, cfg), min(a.ups), tuple(sorted(a.ups)),
                    completion=a.completion, response_ids=(a.response_id,))


def rows_for_prompt(answers: list[Answer], cfg: PairingConfig | None = None) -> list[Row]:
    """All training rows from the answers to one normalised prompt (rules 1-5 of the module docstring)."""
    cfg = cfg or PairingConfig()
    if not answers:
        return []
    answers = sorted(answers, key=lambda a: a.response_id)
    out = _Rows(answers[0].prompt_json)
    for rule in (_edits, _regenerations, _thumb_pairs, _unpaired_and_strong):
        rule(out, answers, cfg)
    return out.rows
