"""One generation's bookkeeping: which rows use which rule and guards, which rows are live, what they wrote.

Kept apart from the decoder so that the decode loop (decoding.py) reads top to bottom: the plan fuses a step
for all live rows (one rule call per method group), chooses tokens under the guards, records them and says
which rows finished.
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

    def choose(self, scores: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        if self.temperature == 0:
            return scores.argmax(dim=-1)
        logits = scores / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(-1) - probs > self.top_p  # keeps the first token always
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    method: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish: str = "length"      # "length" | "eos" | "guard" (every candidate refused by a guard)
    steered_tokens: int = 0
    guard_rejections: int = 0   # candidate tokens a guard refused


@dataclass
class _Group:
    method: Method
    rule: object            # the rule's per-generation instance
    guards: list            # the guards' per-generation instances
    rows: torch.Tensor      # request indices (CPU)


class DecodePlan:
    """Rows of one `generate()` call, grouped by method; `live` maps live positions to request indices."""

    def __init__(self, requests: list, methods: list[Method], tokenizer, cloud=None):
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
        self._fallback: torch.Tensor | None = None
        self.cloud = cloud                      # a PartialCloud answers for ids a truncated step left out
        self.downlink = DownlinkStats()
        self.certifier: Certifier | None = None
        self.blocked: set[int] = set()
        self.uses_cloud = any(m.cloud_prompt for m in methods)
        self.uses_plain = any(m.rule.needs_plain for m in methods)
        self.uses_ctx = any(m.rule.needs_ctx for m in methods)

    # -- one step ------------------------------------------------------------------------------------
    def _positions(self) -> list[tuple[_Group, torch.Tensor]]:
        """(group, live positions of its rows) for every group with live rows."""
        pos_of = torch.full((len(self.gens),), -1, dtype=torch.long)
        pos_of[self.live] = torch.arange(self.live.numel())
        out = []
        for g in self.groups:
            pos = pos_of[g.rows]
            pos = pos[pos >= 0]
            if pos.numel():
                out.append((g, pos))
        return out

    def fuse(self, view: StepView, vocab: int, top=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores `[live, V]` and steered flags `[live]` from each group's rule on its rows. `top`: the live rows'
        `TopKLogits` when the cloud step came down truncated (`view.cloud` is then filled with its bounds)."""
        ref = next(t for t in (view.cloud, view.ctx, view.plain) if t is not None)
        self._fallback = view.cloud if view.cloud is not None else view.ctx  # what a guard falls back to
        scores = torch.empty(self.live.numel(), vocab, device=ref.device)
        steered = torch.zeros(self.live.numel(), dtype=torch.bool)
        if top is not None:  # what certifying a truncated cloud step needs per row
            floors = torch.full((self.live.numel(),), float("-inf"), device=ref.device)
            uses_cloud = torch.zeros(self.live.numel(), dtype=torch.bool)
        for g, pos in self._positions():
            sub = view.select(pos.to(ref.device))
            scores[pos.to(ref.device)], steered[pos] = g.rule.fuse(sub)
            if top is not None and g.rule.cloud_prompt is not None:
                uses_cloud[pos] = True
                floor = g.rule.cloud_floor(sub.cloud)
                if floor is not None:
                    floors[pos.to(ref.device)] = floor
        self.certifier = None
        if top is not None:
            lse = top.lse.to(ref.device, torch.float32)
            self.certifier = Certifier(self.cloud, scores, view.cloud, view.known, top.bound.to(ref.device) - lse,
                                       lse, floors, uses_cloud, self.downlink, top.ids.shape[1])
        return scores, steered

    def choose(self, scores: torch.Tensor, sampling: Sampling, gen, to_device) -> torch.Tensor:
        """Fused-vocabulary token per live row; guarded rows re-choose while a guard refuses. A row whose every
        candidate a guard refuses is marked blocked (it finishes with finish='guard': nothing leaks)."""
        if self.certifier is not None:
            self.certifier.prepare(sampling)
            if sampling.temperature == 0:
                for p in range(scores.shape[0]):
                    self.certifier.settle(p, scores[p])
        tok = sampling.choose(scores, gen)
        self.blocked: set[int] = set()
        if not self.guarded:
            return tok
        dev = to_device(tok).tolist()
        for g, pos in self._positions():
            if not g.guards:
                continue
            for p in pos.tolist():
                r = int(self.live[p])
                fallback = self._fallback[p:p + 1] if self._fallback is not None else None
                chosen = self._guarded_choice(g, r, p, scores[p:p + 1], fallback, tok[p], dev[p], sampling, gen,
                                              to_device)
                if chosen is None:
                    self.blocked.add(p)
                else:
                    tok[p] = chosen
        return tok

    def _without(self, p: int, row_scores: torch.Tensor, rejected: list[int]) -> torch.Tensor:
        """`[1, V]` row scores with the refused tokens removed (and, for a truncated cloud step, the next winner
        certified first: settling corrects `row_scores` in place)."""
        if self.certifier is not None:
            self.certifier.settle(p, row_scores[0], rejected)
        masked = row_scores.clone()
        masked[0, rejected] = float("-inf")
        return masked

    def _guarded_choice(self, g: _Group, r: int, p: int, row_scores, fallback, tok, dev_tok, sampling, gen,
                        to_device):
        """Mask refused tokens and choose again; once the rule's own candidates run out (e.g. the plausibility
        mask leaves one token), continue from the base policy (the cloud's, else the device's)."""
        row_in_group = int((g.rows == r).nonzero()[0])
        history = self.gens[r].token_ids
        rejected: list[int] = []
        for _ in range(MAX_GUARD_REJECTIONS):
            if all(guard.allows(row_in_group, history, dev_tok) for guard in g.guards):
                return tok
            self.gens[r].guard_rejections += 1
            rejected.append(int(tok))
            masked = self._without(p, row_scores, rejected)
            if not bool((masked[0] > NEG).any()):
                if fallback is None or row_scores is fallback:
                    return None
                row_scores = fallback
                masked = self._without(p, fallback, rejected)
                if not bool((masked[0] > NEG).any()):
                    return None
            tok = sampling.choose(masked, gen)[0]
            dev_tok = int(to_device(tok.view(1))[0])
        return None

    # -- bookkeeping ---------------------------------------------------------------------------------
    def record(self, dev_ids: list[int], steered: torch.Tensor, is_eos, ignore_eos: bool, on_token) -> torch.Tensor:
        """Append each live row's token (or finish it at EOS); return which live positions finished."""
        finished = torch.zeros(self.live.numel(), dtype=torch.bool)
        for p, r in enumerate(self.live.tolist()):
            if p in self.blocked:
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

    def needs_device(self) -> bool:
        """Does any live row's rule still need the device streams?"""
        return any(bool(g.rule.needs_device(self.live[pos]).any()) for g, pos in self._positions())
