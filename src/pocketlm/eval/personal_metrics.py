"""Judge-free scores for "does the cloud now write for this user": target match, fluency and degeneration.

- `language_of`: a small stop-word identifier for the fortunes users' four languages (en, de, es, it): each
  language's most frequent function words; the language with the most hits wins (None without any hit).
- `UnigramUsers`: per-user unigram word models built from the users' *training* splits (add-one smoothing);
  an output's nearest user is the one under whose model it is most likely (AG News topics).
- `distinct2`: distinct word bigrams / all bigrams (low = repetitive, a degeneration guard).
- `cloud_perplexity`: the cloud's own perplexity of an output given the public prompt (a fluency guard).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from ..steer.fusion.leakage import words

STOP_WORDS = {
    "en": "the and of to a in is that it for you was with on as have be at not this but by from are or his".split(),
    "de": "der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden "
          "aus er hat dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur "
          "oder aber vor zur bis mehr durch man ich du wenn".split(),
    "es": "de la que el en y a los del se las por un para con no una su al lo como más pero sus le ya o este "
          "sí porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante".split(),
    "it": "di e il la che a per un in è non una sono del le si della con da i dei mi ma al come lo gli ha "
          "anche più se nel delle io ti questo tutto alla ci cosa hai fare quando".split(),
}
LANGUAGE_NAMES = {"en": "English", "de": "German", "es": "Spanish", "it": "Italian"}


def language_of(text: str) -> str | None:
    ws = words(text)
    hits = {lang: sum(w in set(sw) for w in ws) for lang, sw in STOP_WORDS.items()}
    best = max(hits, key=hits.get)
    return best if hits[best] > 0 else None


class UnigramUsers:
    """Per-user add-one-smoothed unigram models over words; `nearest(text)` is the most likely user."""

    def __init__(self, texts: dict[str, str]):
        self.counts = {u: Counter(words(t)) for u, t in texts.items()}
        vocab = set().union(*self.counts.values()) if self.counts else set()
        self.vocab = len(vocab) + 1
        self.totals = {u: sum(c.values()) for u, c in self.counts.items()}

    def log_likelihood(self, text: str, user: str) -> float:
        c, n = self.counts[user], self.totals[user]
        return sum(math.log((c[w] + 1) / (n + self.vocab)) for w in words(text))

    def nearest(self, text: str) -> str | None:
        if not words(text) or not self.counts:
            return None
        return max(self.counts, key=lambda u: self.log_likelihood(text, u))


def distinct2(text: str) -> float:
    ws = words(text)
    grams = list(zip(ws, ws[1:], strict=False))
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.inference_mode()
def cloud_perplexity(model, prompt_ids: list[int], output_ids: list[int]) -> float | None:
    """exp(mean NLL) of the output tokens under the cloud model, given the prompt (None for an empty output)."""
    if not output_ids:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids + output_ids], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(output_ids, device=device))
    return float(torch.exp(nll))
