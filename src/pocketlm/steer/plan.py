"""One generation's bookkeeping: which rows use which rule and guards, which rows are live, what they wrote.

Kept apart from the decoder so that the decode loop (engine.py) reads top to bottom, one stage per call, each
returning what the next takes: `fuse` (one rule call per method group) -> `certify` (only for a truncated cloud
step: make the greedy winners exact, asking the cloud where the top-k is not enough) -> `choose` (tokens under
the guards, and the rows a guard blocked) -> `record` (append, and say which rows finished) -> `keep`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import PocketLMError
from .downlink.certify import SAMPLING_MODES, Certifier, DownlinkStats
from .fusion.formulas import NEG
from .fusion.methods import Method
from .fusion.rules import StepView

MAX_GUARD_REJECTIONS = 256  # per row and step; past it the row ends (finish='guard') rather than leak


@dataclass
class Sampling:
    """temperature 0 = greedy argmax; otherwise softmax(scores / temperature) with top-p, seeded. `downlink`:
    how sampling treats a top-k cloud step (certify.py): `exact` fetches the full rows, `truncated` samples
    among the top-k ids only."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    downlink: str = "exact"

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0) or not 0 < self.top_p <= 1:
            raise PocketLMError(f"bad sampling settings: temperature={self.temperature}, top_p={self.top_p}")
        if self.downlink not in SAMPLING_MODES:
            raise PocketLMError(f"downlink sampling must be one of {', '.join(SAMPLING_MODES)}, got {self.downlink!r}")

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution a sampled token is drawn from: softmax(scores / temperature), cut to the top-p
        nucleus (what speculative sampling accepts against)."""
        logits = scores / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keeps the first token always
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return logits.softmax(dim=-1)

    def choose(self, scores: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.temperature == 0:
            return scores.argmax(dim=-1)
        return torch.multinomial(self.probs(scores), 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    method: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = "length"      # "length" | "eos" | "guard" (every candidate refused by a guard)
    steered_tokens: int = 0
    guard_rejections: int = 0   # candidate tokens a guard refused
    drafted_tokens: int = 0     # speculative draft tokens sent to the cloud (accepted or not)
    round_trips: int = 0        # speculative runs: cloud calls this row waited for, the prefill included
    rejected: list = field(default_factory=list)  # (start, device ids): each rejected draft suffix, sent after
    #                                               token_ids[:start] — what reached the cloud besides the output


@dataclass
class Fused:
    """One step's fused scores `[live, V]`, steered flags `[live]` (CPU) and what the guards fall back to when a
    rule's own candidates run out (the cloud's log-policy, else the device's with context)."""

    scores: torch.Tensor
    steered: torch.Tensor
    fallback: torch.Tensor | None
    floors: torch.Tensor | None = None      # [live] each rule's cloud floor (-inf: none); truncated steps only
    uses_cloud: torch.Tensor | None = None  # [live] bool: rows whose scores contain the cloud; truncated only


@dataclass
class Choice:
    """The chosen fused-vocabulary token per live row, and the live positions a guard blocked (every candidate
    refused: the row ends with finish='guard', nothing leaks)."""

    tokens: torch.Tensor
    blocked: set[int] = field(default_factory=set)


@dataclass
class _Group:
    method: Method
    rule: object            # the rule's per-generation instance
    guards: list            # the guards' per-generation instances
    rows: torch.Tensor      # request indices (CPU)


class DecodePlan:
    """Rows of one `generate()` call, grouped by method; `live` maps live positions to request indices."""

    def __init__(self, requests: list, methods: list[Method], tokenizer, drafting: bool = False):
        if len(requests) != len(methods) or not requests:
            raise PocketLMError("generate() needs one method per request and at least one request")
        for r, m in zip(requests, methods, strict=True):
            if m.needs_context and not r.private:
                raise PocketLMError(f"method {m.name!r} needs a private context")
        self.methods = methods
        self.gens = [Generation(m.name) for m in methods]
        self.live = torch.arange(len(requests))
        by_method: dict[Method, list[int]] = {}  # rows of one method (rule + guards) share its per-row state
        for i, m in enumerate(methods):
            by_method.setdefault(m, []).append(i)
        self.groups = []
        for idx in by_method.values():
            m = methods[idx[0]]
            sub = [requests[i] for i in idx]
            self.groups.append(_Group(m, m.rule.start(len(requests)), [g.start(sub, tokenizer) for g in m.guards],
                                      torch.tensor(idx)))
        self.guarded = any(g.guards for g in self.groups)
        self.downlink = DownlinkStats()
        self.uses_cloud = any(m.cloud_prompt for m in methods)
        self.uses_plain = drafting or any(m.rule.needs_plain for m in methods)  # a draft stands in with it
        self.uses_ctx = any(m.rule.needs_ctx for m in methods)

    # -- one step ------------------------------------------------------------------------------------
    def _positions(self, live: torch.Tensor | None = None) -> list[tuple[_Group, torch.Tensor]]:
        """(group, positions of its rows in `live`) for every group with rows there (default: the live rows;
        a speculative round passes the rows still verifying at one draft position)."""
        live = self.live if live is None else live
        pos_of = torch.full((len(self.gens),), -1, dtype=torch.long)
        pos_of[live] = torch.arange(live.numel())
        out = []
        for g in self.groups:
            pos = pos_of[g.rows]
            pos = pos[pos >= 0]
            if pos.numel():
                out.append((g, pos))
        return out

    def fuse(self, view: StepView, vocab: int, draft: bool = False) -> Fused:
        """Each group's rule on the view's rows (`view.rows`: request indices). When the cloud step came down
        truncated (`view.known` set) also each row's cloud floor and whether it uses the cloud: what certifying
        it needs. `draft`: the rules' device-only stand-ins instead (`FusionRule.draft`; no cloud, no state)."""
        ref = next(t for t in (view.cloud, view.ctx, view.plain) if t is not None)
        n, truncated = view.rows.numel(), view.known is not None
        out = Fused(torch.empty(n, vocab, device=ref.device), torch.zeros(n, dtype=torch.bool),
                    view.cloud if view.cloud is not None else view.ctx)
        if truncated:
            out.floors = torch.full((n,), float("-inf"), device=ref.device)
            out.uses_cloud = torch.zeros(n, dtype=torch.bool)
        for g, pos in self._positions(view.rows):
            sub = view.select(pos.to(ref.device))
            if draft:
                out.scores[pos.to(ref.device)] = g.rule.draft(sub)
                continue
            out.scores[pos.to(ref.device)], out.steered[pos] = g.rule.fuse(sub)
            if truncated and g.rule.cloud_prompt is not None:
                out.uses_cloud[pos] = True
                floor = g.rule.cloud_floor(sub.cloud)
                if floor is not None:
                    out.floors[pos.to(ref.device)] = floor
        return out

    def certify(self, fused: Fused, view: StepView, top, source, sampling: Sampling) -> Certifier | None:
        """For a truncated cloud step (`top`: the live rows' `TopKLogits`; `source`: the cloud that answers for
        the ids it left out): make every greedy winner exact, or fetch what sampling needs. Corrects
        `fused.scores` and the fallback in place; returns the certifier the guards' re-choices settle with."""
        if top is None:
            return None
        lse = top.lse.to(fused.scores.device, torch.float32)
        cert = Certifier(source, fused.scores, view.cloud, view.known, top.bound.to(fused.scores.device) - lse,
                         lse, fused.floors, fused.uses_cloud, self.downlink, top.ids.shape[1])
        cert.prepare(sampling)
        if sampling.temperature == 0:
            for p in range(fused.scores.shape[0]):
                cert.settle(p, fused.scores[p])
        return cert

    def choose(self, fused: Fused, sampling: Sampling, gen, to_device, certifier: Certifier | None = None,
               live: torch.Tensor | None = None, drafted: list[list[int]] | None = None) -> Choice:
        """Fused-vocabulary token per row of `live` (default: the live rows); guarded rows re-choose while a
        guard refuses (a re-choice from a truncated step is certified again through `certifier`). `drafted[p]`:
        tokens a speculative draft put after row p's recorded ones (the guards judge them as written)."""
        live = self.live if live is None else live
        tok = sampling.choose(fused.scores, gen)
        choice = Choice(tok)
        if not self.guarded:
            return choice
        dev = to_device(tok).tolist()
        for g, pos in self._positions(live):
            if not g.guards:
                continue
            for p in pos.tolist():
                r = int(live[p])
                fallback = fused.fallback[p:p + 1] if fused.fallback is not None else None
                history = self.gens[r].token_ids + (drafted[p] if drafted else [])
                chosen = self._guarded_choice(g, r, p, fused.scores[p:p + 1], fallback, tok[p], dev[p], sampling, gen,
                                              to_device, certifier, history)
                if chosen is None:
                    choice.blocked.add(p)
                else:
                    tok[p] = chosen
        return choice

    @staticmethod
    def _without(p: int, row_scores: torch.Tensor, rejected: list[int], certifier) -> torch.Tensor:
        """`[1, V]` row scores with the refused tokens removed (and, for a truncated cloud step, the next winner
        certified first: settling corrects `row_scores` in place)."""
        if certifier is not None:
            certifier.settle(p, row_scores[0], rejected)
        masked = row_scores.clone()
        masked[0, rejected] = float("-inf")
        return masked

    def _guarded_choice(self, g: _Group, r: int, p: int, row_scores, fallback, tok, dev_tok, sampling, gen,
                        to_device, certifier, history):
        """Mask refused tokens and choose again; once the rule's own candidates run out (e.g. the plausibility
        mask leaves one token), continue from the base policy (the cloud's, else the device's)."""
        row_in_group = int((g.rows == r).nonzero()[0])
        rejected: list[int] = []
        for _ in range(MAX_GUARD_REJECTIONS):
            if all(guard.allows(row_in_group, history, dev_tok) for guard in g.guards):
                return tok
            self.gens[r].guard_rejections += 1
            rejected.append(int(tok))
            masked = self._without(p, row_scores, rejected, certifier)
            if not bool((masked[0] > NEG).any()):
                if fallback is None or row_scores is fallback:
                    return None
                row_scores = fallback
                masked = self._without(p, fallback, rejected, certifier)
                if not bool((masked[0] > NEG).any()):
                    return None
            tok = sampling.choose(masked, gen)[0]
            dev_tok = int(to_device(tok.view(1))[0])
        return None

    # -- bookkeeping ---------------------------------------------------------------------------------
    def record(self, choice: Choice, dev_ids: list[int], steered: torch.Tensor, is_eos, ignore_eos: bool,
               on_token, live: torch.Tensor | None = None) -> torch.Tensor:
        """Append each row's token (or finish it at EOS or a guard's block); return which positions finished."""
        live = self.live if live is None else live
        finished = torch.zeros(live.numel(), dtype=torch.bool)
        for p, r in enumerate(live.tolist()):
            if p in choice.blocked:
                self.gens[r].finish = "guard"
                finished[p] = True
                continue
            if is_eos(p, r) and not ignore_eos:
                self.gens[r].finish = "eos"
                finished[p] = True
                continue
            self.gens[r].token_ids.append(dev_ids[p])
            self.gens[r].steered_tokens += int(steered[p])
            if on_token is not None:
                on_token(r, dev_ids[p])
        return finished

    def keep(self, positions: torch.Tensor) -> None:
        """Only these live positions go on (finished rows leave)."""
        self.live = self.live[positions]

    def needs_device(self) -> bool:
        """Does any live row's rule still need the device streams?"""
        return any(bool(g.rule.needs_device(self.live[pos]).any()) for g, pos in self._positions())
