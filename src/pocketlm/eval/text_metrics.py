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


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F1 (x100, Porter stemming), as LongLaMP/CoSteer report them."""
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {"rouge1": float("nan"), "rougeL": float("nan")}
    scorer = _scorer()
    r1, rl = [], []
    for p, r in zip(predictions, references, strict=True):
        s = scorer.score(r, p)
        r1.append(s["rouge1"].fmeasure)
        rl.append(s["rougeL"].fmeasure)
    return {"rouge1": float(100 * mean(r1)), "rougeL": float(100 * mean(rl))}


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
