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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean

from ..progress import progress
from ..steer.decoding import SteerEngine, SteerRequest, chat_ids
from ..steer.methods import NO_CONTEXT_SIGNALS, get_method
from .personal_metrics import cloud_perplexity, distinct2

log = logging.getLogger(__name__)

PERSONAL_METHODS = ("cloud", "cloud_prompted", "weights", "context", "both", "specialist")


@dataclass(frozen=True)
class UserTarget:
    user: str
    profile: str    # one sentence, private context for `context` / `both`
    hint: str       # appended to the prompt for `cloud_prompted` (not private)


def language_target(user: str, name: str) -> UserTarget:
    """A language user's private profile sentence and the open hint `cloud_prompted` gets."""
    return UserTarget(user, f"I am a native {name} speaker and always write in {name}.", f"Answer in {name}.")


FUSIONS = ("closed_form", "plausible", "ada_costeer")


def _row(method: str, prompt: str, t: UserTarget, kappa: float, fusion: str = "closed_form"):
    steer = get_method(f"{fusion}@{kappa:g}")
    if method == "cloud":
        return SteerRequest(prompt), get_method("cloud")
    if method == "cloud_prompted":
        return SteerRequest(f"{prompt} {t.hint}"), get_method("cloud")
    if method in NO_CONTEXT_SIGNALS:
        return SteerRequest(prompt), steer.with_signal(method)
    return SteerRequest.with_context(prompt, t.profile), steer.with_signal(method)


def evaluate_personal(engines: Callable[[str], SteerEngine], targets: list[UserTarget], prompts: list[str],
                      match: Callable[[str, str], bool], cloud_model, *, methods=PERSONAL_METHODS,
                      kappa: float = 1.0, max_new_tokens: int = 48, fusion: str = "closed_form") -> dict:
    """`engines(user)` gives the engine whose device is that user's personal model (same cloud for all).
    `fusion`: how the device signals steer: the closed form; behind the plausibility mask (the cloud's own
    fluency guard: only tokens with p_cloud >= 0.1 max p_cloud); or gated as AdaCoSteer (the closed form until the
    cloud is confident 3 tokens in a row, then the cloud alone: it steers the opening, the cloud writes on)."""
    doc: dict = {"users": {}, "mean": {}, "examples": []}
    for t in progress(targets, desc="eval-personal users", total=len(targets)):
        engine = engines(t.user)
        per: dict[str, dict[str, list]] = {m: {"match": [], "cloud_ppl": [], "cloud_ppl_told": [], "distinct2": []}
                                           for m in methods}
        for prompt in prompts:
            prompt_ids = chat_ids(engine.cloud_tok, prompt, engine.system)
            told_ids = chat_ids(engine.cloud_tok, f"{prompt} {t.hint}", engine.system)
            rows = [_row(m, prompt, t, kappa, fusion) for m in methods]
            gens = engine.generate([r for r, _ in rows], [m for _, m in rows], max_new_tokens=max_new_tokens)
            for name, (req, _), g in zip(methods, rows, gens, strict=True):
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
    for m in methods:
        rows = [doc["users"][u][m] for u in doc["users"]]
        ppls = [r["cloud_ppl"] for r in rows if r["cloud_ppl"] is not None]
        told = [r["cloud_ppl_told"] for r in rows if r["cloud_ppl_told"] is not None]
        doc["mean"][m] = {"match": fmean(r["match"] for r in rows), "distinct2": fmean(r["distinct2"] for r in rows),
                          "cloud_ppl": fmean(ppls) if ppls else None, "cloud_ppl_told": fmean(told) if told else None,
                          "n": sum(r["n"] for r in rows)}
    return doc
