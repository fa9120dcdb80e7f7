"""PII scrubbing rules, shared by the Spark builder (Java regex), Python and polars (Rust regex).

Every pattern avoids look-around so the three regex engines read it the same way. Applied in this
order (a card number must go before the phone rule sees its digits):

  secret  API keys and tokens (sk-/pk-/rk-, GitHub gh?_, Slack xox?-, AWS AKIA, JWTs, `password: x`)
  email   local@domain.tld
  card    13-19 digits, optionally grouped by spaces or dashes
  phone   +country, (area) or area- prefix, then 3-4 + 3-4 digits with separators
  name    a capitalised name after a cue ("my name is", "I'm", "call me", "Dear", "Hi", "Hello")

The secret value stops at quotes and backslashes so that scrubbing a JSON string keeps it valid JSON.
A match is replaced by a placeholder ([SECRET], [EMAIL], [CARD], [PHONE]; a name keeps its cue:
"my name is [NAME]"). Names without a cue are not detectable by rules and are not caught.
"""

from __future__ import annotations

import re

# (name, pattern, replacement with group 1 written as {1})
RULES: list[tuple[str, str, str]] = [
    ("secret", r"(?:\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,}|\bgh[pousr]_[A-Za-z0-9]{20,}|\bxox[abprs]-[A-Za-z0-9-]{10,}"
               r"|\bAKIA[0-9A-Z]{16}\b|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
               r"|(?i:\b(?:api[_-]?key|access[_-]?token|secret|password|passwd)\b\s*[:=]\s*)[^\s,;\"'\\]+)",
     "[SECRET]"),
    ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", "[EMAIL]"),
    ("card", r"\b\d(?:[ -]?\d){12,18}\b", "[CARD]"),
    ("phone", r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\b\d{2,4}[ .-])\d{3,4}[ .-]?\d{3,4}\b", "[PHONE]"),
    ("name", r"((?i:\bmy name is|\bi am|\bi'm|\bcall me|\bdear|\bhi|\bhello)[ ,]+)[A-Z][a-z]+(?: [A-Z][a-z]+)?",
     "{1}[NAME]"),
]
KINDS = tuple(name for name, _, _ in RULES)
_COMPILED = [(name, re.compile(p), r.replace("{1}", r"\1")) for name, p, r in RULES]


def scrub(text: str | None) -> tuple[str | None, dict[str, int]]:
    """The text with every PII match replaced, and the number of matches per kind."""
    counts = dict.fromkeys(KINDS, 0)
    if text is None:
        return None, counts
    for name, rx, repl in _COMPILED:
        text, n = rx.subn(repl, text)
        counts[name] += n
    return text, counts


def java_replacement(repl: str) -> str:
    """The replacement string for Spark's regexp_replace (Java: $1)."""
    return repl.replace("{1}", "$1")


def rust_replacement(repl: str) -> str:
    """The replacement string for polars' str.replace_all (Rust regex: ${1})."""
    return repl.replace("{1}", "${1}")
