"""How much of a private context a text repeats: word spans copied from it, and its context-only words.

Shared by the device-side leak guard (steer/leak_guard.py), which must stop a copy while it is being written,
and by the evaluation (eval/steer_eval.py), which measures what got through. Words are lower-cased runs of
letters and digits (any script), so casing and punctuation never hide a copy.
"""

from __future__ import annotations

import re

WORD = re.compile(r"\w+", re.UNICODE)

# A small English stop-word list: words too common to reveal anything about a person.
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which
while who whom why will with would you your yours yourself yourselves also always every many much one two
like get make write answer message please want would could should let us may might must shall
""".split())


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(ws: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def longest_copy(output: str, context: str, public: str = "") -> int:
    """Length in words of the longest run of the output's words that occurs contiguously in the context and not
    in the public prompt (a span the cloud already has is no leak)."""
    out, ctx = words(output), words(context)
    pub = " ".join(words(public))
    best = 0
    # dynamic programming over (output position, context position): run lengths of equal words
    prev = [0] * (len(ctx) + 1)
    for i in range(1, len(out) + 1):
        cur = [0] * (len(ctx) + 1)
        for j in range(1, len(ctx) + 1):
            if out[i - 1] == ctx[j - 1]:
                cur[j] = prev[j - 1] + 1
                if cur[j] > best and not _public(out[i - cur[j]:i], pub):
                    best = cur[j]
        prev = cur
    return best


def _public(span: list[str], public_joined: str) -> bool:
    return bool(public_joined) and f" {' '.join(span)} " in f" {public_joined} "


def ngram_share(output: str, context: str, n: int = 5) -> float:
    """Share of the context's distinct word n-grams that appear in the output (0 when the context has none)."""
    grams = ngrams(words(context), n)
    return len(grams & ngrams(words(output), n)) / len(grams) if grams else 0.0


def context_only_words(context: str, public: str) -> set[str]:
    """Non-stop-words of the private context that the public prompt does not contain."""
    return {w for w in words(context) if w not in STOP_WORDS and not w.isdigit() and len(w) > 2} - set(words(public))


def leak_report(output: str, context: str, public: str) -> dict:
    """One generation: 5-gram share, longest copied span (words), and which context-only words it contains."""
    leaked = sorted(context_only_words(context, public) & set(words(output)))
    return {"ngram5_share": ngram_share(output, context, 5), "longest_copy_words": longest_copy(output, context, public),
            "context_words": leaked}
