"""Reference-overlap metrics for generated text: ROUGE-1 / ROUGE-L (rouge-score) and METEOR (nltk).

METEOR needs nltk's WordNet data. Nothing is downloaded at run time: when the data is not installed the
metric is reported as unavailable with the reason, never approximated.
"""

from __future__ import annotations

import functools
import logging
from statistics import mean

log = logging.getLogger(__name__)


@functools.cache
def _scorer():
    """One scorer per process: building one costs a tokenizer setup (and an absl log line) each time."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)


def rouge_per_example(predictions: list[str], references: list[str]) -> list[tuple[float, float]]:
    """(ROUGE-1, ROUGE-L) F1 in [0, 1] of each prediction against its reference (Porter stemming)."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    scorer = _scorer()
    out = []
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)
        out.append((s["rouge1"].fmeasure, s["rougeL"].fmeasure))
    return out


def rouge_means(per_example: list[tuple[float, float]]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 x100, as LongLaMP/CoSteer report them."""
    if not per_example:
        return {"rouge1": float("nan"), "rougeL": float("nan")}
    return {"rouge1": float(100 * mean(a for a, _ in per_example)),
            "rougeL": float(100 * mean(b for _, b in per_example))}


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (x100, Porter stemming) of a set of predictions."""
    return rouge_means(rouge_per_example(predictions, references))


def meteor_status() -> tuple[bool, str]:
    """(available, reason). Checks for WordNet without downloading anything."""
    try:
        import nltk
        from nltk.corpus import wordnet

        nltk.data.find("corpora/wordnet")
        wordnet.ensure_loaded()
    except LookupError:
        return False, "nltk WordNet data is not installed (offline; nothing is downloaded)"
    except Exception as e:  # zip/format problems in a partial install
        return False, f"nltk WordNet unusable: {type(e).__name__}: {e}"
    return True, "ok"


def meteor(predictions: list[str], references: list[str]) -> float | None:
    """Mean METEOR (x100) or None when WordNet is unavailable."""
    ok, reason = meteor_status()
    if not ok:
        log.info("METEOR unavailable: %s", reason)
        return None
    from nltk.translate.meteor_score import meteor_score

    vals = [meteor_score([r.split()], p.split()) for p, r in zip(predictions, references, strict=True)]
    return float(100 * mean(vals)) if vals else float("nan")
