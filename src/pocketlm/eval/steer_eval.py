"""Evaluate steering methods on CoGenesis/LongLaMP rows: generate with every method, score ROUGE/METEOR.

Per example, all methods run as ONE batch (one row per method): each distinct prompt is prefilled once and
its cache copied to the rows that use it, and one batched step costs far less than one decode per method.
Results are rewritten after every example, so an interrupted run still leaves honest partial numbers.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from statistics import fmean, stdev

from ..data.steering import SteerExample
from ..errors import DataError
from ..jsonfile import write_json
from ..progress import progress
from ..steer.engine import Sampling, SteerEngine, SteerRequest
from ..steer.fusion.leakage import leak_report
from ..steer.fusion.methods import Method
from .text_metrics import meteor, meteor_status, rouge_means, rouge_per_example

log = logging.getLogger(__name__)


def leak_summary(texts: list[str], examples: list[SteerExample]) -> dict:
    """Per method: mean share of the context's distinct word 5-grams in the output, the longest copied span over
    the examples (words; spans of the public prompt do not count), and the share of outputs containing a
    context-only word (a non-stop-word of the private context absent from the public prompt)."""
    reports = [leak_report(t, e.private, e.query) for t, e in zip(texts, examples, strict=False)]
    if not reports:
        return {"ngram5_share": 0.0, "longest_copy_words": 0, "context_word_share": 0.0}
    return {"ngram5_share": fmean(r["ngram5_share"] for r in reports),
            "longest_copy_words": max(r["longest_copy_words"] for r in reports),
            "context_word_share": fmean(1.0 if r["context_words"] else 0.0 for r in reports)}


def sent_leak_summary(sent: list[list[str]], examples: list[SteerExample]) -> dict:
    """`leak_summary` over everything that reached the cloud: per example the output and every rejected
    speculative draft after the output it followed (each a text); the worst of them counts."""
    reports = [[leak_report(t, e.private, e.query) for t in texts] for texts, e in zip(sent, examples, strict=False)]
    if not reports:
        return {"ngram5_share": 0.0, "longest_copy_words": 0, "context_word_share": 0.0}
    return {"ngram5_share": fmean(max(r["ngram5_share"] for r in rs) for rs in reports),
            "longest_copy_words": max(r["longest_copy_words"] for rs in reports for r in rs),
            "context_word_share": fmean(1.0 if any(r["context_words"] for r in rs) else 0.0 for rs in reports)}


def score(methods: list[Method], outputs: dict[str, list[str]], references: list[str],
          examples: list[SteerExample] | None = None, sent: dict[str, list[list[str]]] | None = None,
          drafted: dict[str, list[tuple[int, int, int]]] | None = None) -> dict:
    """`{"methods": {name: {rouge1, rougeL, meteor, n, leak}}, "meteor": {...}}` over the examples done so far
    (`leak` when the examples, with their private contexts, are given). Speculative runs (`sent`: per method
    and example the output plus each rejected draft as sent; `drafted`: (draft tokens sent, output tokens,
    round trips, the prefill's included)) add `leak_sent` over everything that went up, `drafted_per_token` and
    `tokens_per_round_trip`."""
    ok, reason = meteor_status()
    doc: dict = {"methods": {}, "meteor": {"available": ok, "reason": reason}}
    per: dict[str, list[tuple[float, float]]] = {}  # each example scored once, for the means and the deltas
    for m in methods:
        preds = outputs[m.name]
        refs = references[: len(preds)]
        per[m.name] = rouge_per_example(preds, refs)
        row = {**rouge_means(per[m.name]), "n": len(preds), "private": m.private, "doc": m.doc}
        row["meteor"] = meteor(preds, refs) if ok else None
        if examples is not None:
            row["leak"] = leak_summary(preds, examples[: len(preds)])
            if drafted and sum(d for d, _, _ in drafted.get(m.name, [])):
                row["leak_sent"] = sent_leak_summary(sent[m.name], examples[: len(preds)])
        if drafted and sum(d for d, _, _ in drafted.get(m.name, [])):
            made = sum(t for _, t, _ in drafted[m.name])
            row["drafted_per_token"] = sum(d for d, _, _ in drafted[m.name]) / made if made else 0.0
            trips = sum(r for _, _, r in drafted[m.name])
            row["tokens_per_round_trip"] = made / trips if trips else None
        doc["methods"][m.name] = row
    if "cloud" in per:
        base = [100 * r1 for r1, _ in per["cloud"]]
        for m in methods:
            d = [100 * r1 - b for (r1, _), b in zip(per[m.name], base, strict=True)]
            se = stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
            doc["methods"][m.name]["rouge1_delta_vs_cloud"] = {"mean": fmean(d) if d else float("nan"), "se": se}
    return doc


def evaluate(engine: SteerEngine, examples: list[SteerExample], methods: list[Method], *,
             max_new_tokens: int = 128, sampling: Sampling | None = None, json_out: Path | None = None,
             settings: dict | None = None) -> dict:
    outputs: dict[str, list[str]] = {m.name: [] for m in methods}
    sent: dict[str, list[list[str]]] = {m.name: [] for m in methods}
    drafted: dict[str, list[tuple[int, int, int]]] = {m.name: [] for m in methods}
    records: list[dict] = []
    tok = engine.device_tok
    refs = [e.reference for e in examples]
    t0 = time.perf_counter()
    doc: dict = {}
    for i, ex in enumerate(progress(examples, desc="eval-steer examples", total=len(examples))):
        req = SteerRequest(ex.query, ex.private)
        rec = {"id": ex.id, "outputs": {}}
        gens = engine.generate([req] * len(methods), methods, max_new_tokens=max_new_tokens, sampling=sampling)
        for m, g in zip(methods, gens, strict=True):
            outputs[m.name].append(g.text)
            rec["outputs"][m.name] = {"text": g.text, "tokens": len(g.token_ids), "finish": g.finish,
                                      "steered_tokens": g.steered_tokens}
            rejected = [tok.decode(g.token_ids[:start] + ids, skip_special_tokens=True) for start, ids in g.rejected]
            if g.drafted_tokens:  # speculative: what else reached the cloud
                rec["outputs"][m.name].update(drafted_tokens=g.drafted_tokens, rejected_drafts=rejected)
            sent[m.name].append([g.text, *rejected])
            drafted[m.name].append((g.drafted_tokens, len(g.token_ids), g.round_trips))
        records.append(rec)
        doc = score(methods, outputs, refs, examples, sent, drafted)
        doc.update(settings or {})
        doc.update(examples_done=i + 1, examples_planned=len(examples),
                   elapsed_s=round(time.perf_counter() - t0, 1), examples=records)
        if json_out is not None:
            write_json(doc, json_out, indent=1, ensure_ascii=False)
        log.info("example %d/%d (%s) done after %.0f s", i + 1, len(examples), ex.id, time.perf_counter() - t0)
    return doc


GENERATION_KEYS = ("cloud", "local", "max_new_tokens", "temperature", "top_p", "seed", "dtype", "vocab", "guards")


def _kappa_value(v) -> float | None:
    """A method's kappa as recorded (a number, or a description such as 'T=20 loop == kappa 1.78326')."""
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return round(float(v), 4)
    found = re.findall(r"kappa\s*([0-9.]+)", str(v))
    return round(float(found[-1]), 4) if found else str(v)


class _MethodInfo:
    """What `score` needs of a method, read back from a results file."""

    def __init__(self, name: str, row: dict):
        self.name, self.private, self.doc = name, row.get("private", True), row.get("doc", "")


def merge_runs(docs: list[dict], examples: list[SteerExample]) -> dict:
    """Pool eval-steer results of disjoint row slices (`--offset`) into one score over their union.

    Scores are recomputed from the stored generations (ROUGE of the union, paired deltas over all rows), for
    the methods present in every run; runs must share the generation settings and each method's kappa.
    """
    if len(docs) < 2:
        raise DataError("merging needs at least two eval-steer results")
    first = docs[0].get("settings", {})
    for d in docs[1:]:
        s = d.get("settings", {})
        diff = [k for k in GENERATION_KEYS if s.get(k) != first.get(k)]
        if diff:
            raise DataError(f"cannot pool runs generated with different settings: {', '.join(diff)}")
    names = [n for n in docs[0]["methods"] if all(n in d["methods"] for d in docs[1:])]
    for n in names:
        kappas = {_kappa_value(d["settings"].get("kappas", {}).get(n)) for d in docs}
        if len(kappas) > 1:
            raise DataError(f"method {n!r} ran with different kappas: {sorted(map(str, kappas))}")
    if not names:
        raise DataError("the runs have no method in common")
    by_id = {e.id: e for e in examples}
    outputs: dict[str, list[str]] = {n: [] for n in names}
    refs, used, records, seen = [], [], [], set()
    for d in docs:
        for rec in d["examples"]:
            if rec["id"] in seen:
                raise DataError(f"example {rec['id']!r} appears in more than one run; pool disjoint slices")
            if rec["id"] not in by_id:
                raise DataError(f"example {rec['id']!r} is not in the data file; pass the file the runs used")
            seen.add(rec["id"])
            refs.append(by_id[rec["id"]].reference)
            used.append(by_id[rec["id"]])
            for n in names:
                outputs[n].append(rec["outputs"][n]["text"])
            records.append({"id": rec["id"], "outputs": {n: rec["outputs"][n] for n in names}})
    doc = score([_MethodInfo(n, docs[0]["methods"][n]) for n in names], outputs, refs, used)
    settings = {k: first.get(k) for k in GENERATION_KEYS}
    settings["kappas"] = {n: first.get("kappas", {}).get(n) for n in names}
    doc.update(settings=settings, examples_done=len(records), merged_from=len(docs),
               elapsed_s=round(sum(d.get("elapsed_s", 0.0) for d in docs), 1), examples=records)
    return doc
