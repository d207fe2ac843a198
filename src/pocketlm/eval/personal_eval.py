"""Does the personal model make the cloud write for its user? Generate for every user with every method, score.

Methods (per user, one batched generation per prompt):
  cloud           the cloud alone on the public prompt (no personalization)
  cloud_prompted  the cloud told the user's language / topic in the prompt: NOT private, an upper reference
  weights         steered by what the user's adapters learned: log p_personal(.|x) - log p_base(.|x)
  context         steered by a one-sentence profile as private context (CoSteer's delta on the personal model)
  both            log p_personal(.|profile, x) - log p_base(.|x)
  specialist      log p_personal(.|x) - log p_shared(.|x): what the user's private experts add over the shared
                  parts (no context; zero by construction for a model whose parts are all shared, e.g. FedAvg)
Scores: target match (the output is in the user's language / nearest to the user's topic), the cloud's own
perplexity of the output given the public prompt (fluency) and distinct-2 (degeneration), per user and averaged
over users. Also `cloud_ppl_told`: the cloud's perplexity of the output given the prompt *with* the user's hint.
Given the public prompt, any switch to the user's language is itself unlikely (an English prompt expects
English), so `cloud_ppl` mixes "off-language" with "disfluent"; given the told prompt, the switch is expected and
what remains is fluency in the user's language; compare it with `cloud_prompted`'s (the cloud's own text when told).

Several kappas in one call (a sweep) run every steered method once per kappa in the same batched generation and
name its columns `method@kappa`: the kappa a signal needs moves with the trained model (two seeds of one run
needed 1.5 and 2), so a user picks it from the match / fluency curve rather than from a fixed default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

from ..errors import PocketLMError
from ..progress import progress
from ..steer.engine import SteerEngine, SteerRequest, chat_ids
from ..steer.fusion.methods import NO_CONTEXT_SIGNALS, get_method
from .personal_metrics import cloud_perplexity, distinct2

log = logging.getLogger(__name__)

PERSONAL_METHODS = ("cloud", "cloud_prompted", "weights", "context", "both", "specialist")
UNSTEERED = ("cloud", "cloud_prompted")  # kappa does not apply: one column each, also in a sweep


@dataclass(frozen=True)
class UserTarget:
    user: str
    profile: str    # one sentence, private context for `context` / `both`
    hint: str       # appended to the prompt for `cloud_prompted` (not private)


def language_target(user: str, name: str) -> UserTarget:
    """A language user's private profile sentence and the open hint `cloud_prompted` gets."""
    return UserTarget(user, f"I am a native {name} speaker and always write in {name}.", f"Answer in {name}.")


FUSIONS = ("closed_form", "plausible", "ada_costeer")


@dataclass(frozen=True)
class Column:
    """One scored column: a method, and the kappa it steers with (None for the unsteered references)."""
    name: str
    method: str
    kappa: float | None


def check_kappas(kappas: Sequence[float]) -> tuple[float, ...]:
    """At least one kappa, each positive and finite (a zero kappa is the cloud, NaN or inf would poison the scores)."""
    if not kappas or any(not 0 < k < math.inf for k in kappas):  # the comparison also refuses NaN
        raise PocketLMError(f"kappa must be positive finite numbers, got {list(kappas)}")
    return tuple(kappas)


def columns(methods: Sequence[str], kappas: Sequence[float]) -> list[Column]:
    """Unsteered methods once; every steered method once per kappa, named `method@kappa` only in a sweep (a single
    kappa keeps the plain method names, as results from before sweeps have them)."""
    out = []
    for m in methods:
        if m in UNSTEERED:
            out.append(Column(m, m, None))
        else:
            out += [Column(m if len(kappas) == 1 else f"{m}@{k:g}", m, k) for k in kappas]
    return out


def _row(col: Column, prompt: str, t: UserTarget, fusion: str = "closed_form"):
    if col.method == "cloud":
        return SteerRequest(prompt), get_method("cloud")
    if col.method == "cloud_prompted":
        return SteerRequest(f"{prompt} {t.hint}"), get_method("cloud")
    steer = get_method(f"{fusion}@{col.kappa:g}").with_signal(col.method)
    if col.method in NO_CONTEXT_SIGNALS:
        return SteerRequest(prompt), steer
    return SteerRequest.with_context(prompt, t.profile), steer


def evaluate_personal(engines: Callable[[str], SteerEngine], targets: list[UserTarget], prompts: list[str],
                      match: Callable[[str, str], bool], cloud_model, *, methods=PERSONAL_METHODS,
                      kappas: Sequence[float] = (1.0,), max_new_tokens: int = 48, fusion: str = "closed_form") -> dict:
    """`engines(user)` gives the engine whose device is that user's personal model (same cloud for all).
    `fusion`: how the device signals steer: the closed form; behind the plausibility mask (the cloud's own
    fluency guard: only tokens with p_cloud >= 0.1 max p_cloud); or gated as AdaCoSteer (the closed form until the
    cloud is confident 3 tokens in a row, then the cloud alone: it steers the opening, the cloud writes on).
    `kappas`: one kappa, or several for a sweep (see the module notes); `doc["columns"]` maps each column to its
    method and kappa."""
    cols = columns(methods, check_kappas(kappas))
    doc: dict = {"users": {}, "mean": {}, "examples": [],
                 "columns": {c.name: {"method": c.method, "kappa": c.kappa} for c in cols}}
    for t in progress(targets, desc="eval-personal users", total=len(targets)):
        engine = engines(t.user)
        per: dict[str, dict[str, list]] = {c.name: {"match": [], "cloud_ppl": [], "cloud_ppl_told": [],
                                                    "distinct2": []} for c in cols}
        for prompt in prompts:
            prompt_ids = chat_ids(engine.cloud_tok, prompt, engine.system)
            told_ids = chat_ids(engine.cloud_tok, f"{prompt} {t.hint}", engine.system)
            rows = [_row(c, prompt, t, fusion) for c in cols]
            gens = engine.generate([r for r, _ in rows], [m for _, m in rows], max_new_tokens=max_new_tokens)
            for name, (req, _), g in zip([c.name for c in cols], rows, gens, strict=True):
                ppl = cloud_perplexity(cloud_model, prompt_ids, g.token_ids)
                per[name]["match"].append(1.0 if match(g.text, t.user) else 0.0)
                per[name]["distinct2"].append(distinct2(g.text))
                if ppl is not None:
                    per[name]["cloud_ppl"].append(ppl)
                    per[name]["cloud_ppl_told"].append(cloud_perplexity(cloud_model, told_ids, g.token_ids))
                doc["examples"].append({"user": t.user, "method": name, "prompt": req.query, "text": g.text})
        doc["users"][t.user] = {m: {"match": fmean(v["match"]), "distinct2": fmean(v["distinct2"]),
                                    "cloud_ppl": fmean(v["cloud_ppl"]) if v["cloud_ppl"] else None,
                                    "cloud_ppl_told": fmean(v["cloud_ppl_told"]) if v["cloud_ppl_told"] else None,
                                    "n": len(v["match"])} for m, v in per.items()}
        log.info("%s: %s", t.user, {m: round(r["match"], 2) for m, r in doc["users"][t.user].items()})
    for m in (c.name for c in cols):
        rows = [doc["users"][u][m] for u in doc["users"]]
        ppls = [r["cloud_ppl"] for r in rows if r["cloud_ppl"] is not None]
        told = [r["cloud_ppl_told"] for r in rows if r["cloud_ppl_told"] is not None]
        doc["mean"][m] = {"match": fmean(r["match"] for r in rows), "distinct2": fmean(r["distinct2"] for r in rows),
                          "cloud_ppl": fmean(ppls) if ppls else None, "cloud_ppl_told": fmean(told) if told else None,
                          "n": sum(r["n"] for r in rows)}
    return doc
