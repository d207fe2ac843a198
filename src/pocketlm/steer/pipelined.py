"""Certification asks sent while the step they are about is still on the wire.

With the overlap on, the cloud request leaves first and the device steps meanwhile, so the device's scores for
a position exist a device step after the request left, while the cloud's answer comes a round trip and a cloud
step after it. Certification then often finds it needs a few exact scores (downlink/certify.py) and asks: one
more round trip. Instead, as soon as the device's scores exist, the ids it expects to need (downlink/candidates.py) go up
on the same connection as an `exact` ask about the position in flight. The step server answers a session's
messages in order, so that answer arrives about a device step after the cloud's rows instead of a round trip
after certification: the asks ride in the step's round trip. Used for the prefill (the first token, where the
context shifts the scores the most: the device prefills while the open travels), every non-speculative step and
the last position of a speculative verify (the one position whose device scores are computed during the verify;
the others' candidates go up inside the verify itself, `verify_candidates`, or right behind it, `VerifyAsks`),
wherever the estimate expects an ask.

Exactness is untouched: the extra ids come back exactly scored and are merged into the step's top-k as known
ids; what they miss is asked for as before. What goes up is what `candidates` already sends with a verify.
"""

from __future__ import annotations

import time

import torch

from .cloud_step import CloudStep
from .downlink.candidates import candidate_ids, expected_asks
from .downlink.certify import MAX_ASK
from .downlink.topk import TopKLogits

MAX_BEHIND = MAX_ASK  # the most ids about one position that go up right behind a verify


def position_candidates(engine, plan, dev, least: int, most: int, k: int) -> list[list[int]] | None:
    """Per live row of `plan`, the cloud ids to ask about at the position whose device scores are `dev` (empty
    for rows whose rule does not use the context); None when the device streams give no delta here."""
    view = engine._view(CloudStep(None), dev, plan.live)
    if view.ctx is None or view.plain is None:
        return None
    n = plan.live.numel()
    kappa = torch.zeros(n)
    floor = torch.full((n,), float("-inf"), device=view.plain.device)
    for g, pos in plan._positions(plan.live):
        if not g.rule.needs_ctx:
            continue
        kappa[pos] = float(g.rule.kappa_value() or 0.0)
        f = g.rule.cloud_floor(view.plain[pos.to(view.plain.device)])
        if f is not None:
            floor[pos.to(floor.device)] = f
    delta = view.ctx - view.plain
    ids = candidate_ids(delta, expected_asks(view.plain, delta, kappa, k, floor), least, most, engine.align.to_cloud)
    steers = [False] * n
    for g, pos in plan._positions(plan.live):
        for p in pos.tolist():
            steers[p] = bool(g.rule.needs_ctx)
    return [ids[p] if steers[p] else [] for p in range(n)]


class PipelinedAsks:
    """One generation's asks-in-flight for a cloud that takes them (`ask_ahead`, with asking on); inactive
    otherwise (every method is then a no-op). Call `mark()` just before the request leaves, `send(dev, mark)`
    from the thread that computed the device's scores, and `merge(top)` on the answer once it is back."""

    def __init__(self, engine, plan, cloud, sampling):
        self.e, self.plan, self.cloud = engine, plan, cloud
        self.on = (cloud is not None and hasattr(cloud, "ask_ahead") and getattr(cloud, "verify_candidates", 0) > 0
                   and sampling.temperature == 0 and engine.overlap)
        self._sent: list[list[list[int]]] = []  # the asks in flight, oldest first (answers come in this order)
        self.sent_at: float | None = None  # perf_counter() when the newest ask in flight went up (None: none is)

    def mark(self) -> int | None:
        """The cloud's count of requests sent so far (the ask waits until the next one has gone up)."""
        return self.cloud.sent_count() if self.on else None

    def send(self, dev, after: int | None, rows: list[bool] | None = None, position: int | None = None):
        """Send the expected asks for the position whose device scores are `dev` (only `rows`, if given); returns
        `dev`, so it can wrap the device step."""
        if not self.on or after is None or dev is None:
            return dev
        ids = self.expected(dev)
        if ids is None:
            return dev
        if rows is not None:
            ids = [i if keep else [] for i, keep in zip(ids, rows, strict=True)]
        if any(ids) and self.cloud.ask_ahead(ids, after=after, position=position):
            self.riding(ids)
        return dev

    def expected(self, dev) -> list[list[int]] | None:
        """Per live row, the ids certification is expected to ask about at the position whose device scores are
        `dev`: only where it is expected to ask at all (no floor of ids, unlike a verify's candidates), since an
        ask in flight delays the step by the time its answer trails the rows. Up to MAX_ASK ids: an `exact` has
        no frame whose width every position shares, unlike a verify's candidates."""
        most = MAX_ASK
        return position_candidates(self.e, self.plan, dev, 0, most, getattr(self.cloud, "k", 1))

    def riding(self, ids: list[list[int]]) -> None:
        """An ask about these ids went up (here, or behind the cloud's request): `merge` reads the answers in the
        order the asks went up."""
        self._sent.append(ids)
        self.sent_at = time.perf_counter()

    def merge(self, top):
        """`top` (the position's `TopKLogits` that the oldest ask in flight is about) with the asked ids appended
        as exactly scored ones, once their answer is read; `top` unchanged when nothing was sent."""
        if not self._sent:
            return top
        ids = self._sent.pop(0)
        if not self._sent:
            self.sent_at = None
        scores = self.cloud.collect_ahead()
        stats = self.plan.downlink
        stats.ahead_requests += 1
        stats.ahead_ids += sum(len(i) for i in ids)
        width = max(len(i) for i in ids)
        pad = getattr(self.cloud, "columns", None) or top.ids.max().item() + 1  # dropped by `dense`
        extra_ids = torch.full((len(ids), width), int(pad), dtype=top.ids.dtype)
        extra = top.bound.to("cpu", torch.float32).unsqueeze(1).repeat(1, width)
        for p, (i, s) in enumerate(zip(ids, scores, strict=True)):
            if i:
                ok = torch.isfinite(s)  # an id the cloud cannot score stays unknown (certification asks again)
                extra_ids[p, : len(i)] = torch.where(ok, torch.tensor(i, dtype=top.ids.dtype), extra_ids[p, : len(i)])
                extra[p, : len(i)] = torch.where(ok, s.to(torch.float32), extra[p, : len(i)])
        return TopKLogits(torch.cat([top.ids, extra_ids.to(top.ids.device)], 1),
                          torch.cat([top.scores.to(torch.float32), extra.to(top.scores.device)], 1), top.bound,
                          top.lse)


def verify_candidates(engine, plan, asks: PipelinedAsks, cloud, dev_seq, lengths: torch.Tensor, positions: int,
                      offset: int) -> tuple[dict, list[tuple[int, list[list[int]]]]]:
    """For a top-k cloud that takes them (`verify_candidates` = the least per position): per row and verified
    position of a speculative verify, the ids its certification is expected to ask about (downlink/candidates.py:
    as many ids of largest delta as the device's stand-in for the cloud says will reach the best, at least the
    least), so that those asks ride in the verify's round trip. Only rows whose rule uses the context, only
    positions the row decides (verified position i decides draft index i + offset) and whose device scores exist
    before the verify leaves (not the last one, stepped meanwhile: `VerifyAsks.then`). Returns (the verify's
    keywords, asks to send right behind it): a position whose ids exceed the verify's `max_verify_candidates`
    would widen every position of the frame to its count (one width for all), so where the cloud takes asks
    behind a verify its ids (up to MAX_ASK) go up as an `exact` about that position instead."""
    least = getattr(cloud, "verify_candidates", 0)
    if not least:
        return {}, []
    n = plan.live.numel()
    inline = max(least, getattr(cloud, "max_verify_candidates", least))
    most = MAX_BEHIND if asks.on else inline
    out = [[[] for _ in range(positions)] for _ in range(n)]
    behind: list[tuple[int, list[list[int]]]] = []
    for i in range(positions):
        j = i + offset
        if j >= len(dev_seq):
            break
        ids = position_candidates(engine, plan, dev_seq[j], least, most, getattr(cloud, "k", least))
        if ids is None:
            continue
        extra = [[] for _ in range(n)]
        for p in range(n):
            if j <= int(lengths[p]):
                if len(ids[p]) > inline:
                    extra[p] = ids[p]
                else:
                    out[p][i] = ids[p]
        if any(extra):
            behind.append((i, extra))
    return ({"candidates": out} if any(c for row in out for c in row) else {}), behind


class VerifyAsks:
    """The asks of one speculative verify besides its inline candidates: those riding right behind it (positions
    too wide for its frame; the round's first position, `first`, as an `exact` without a position) and the one
    that follows it in flight for its last position, whose device scores are made during the verify (rows that
    drafted fewer, `full` False, decide an earlier position, whose asks went up inside the verify). Where the last
    position may be left to the next round (`defer`, deferred.py), `then` only notes whether it expects asks."""

    def __init__(self, asks: PipelinedAsks, kw: dict, behind: list, *, first: list[list[int]] | None, defer: bool,
                 full: list[bool], last: int):
        if first is not None and any(first):
            behind.insert(0, (None, first))
        for _, ids in behind:  # they go up right behind the verify, in this order
            asks.riding(ids)
        self.kw = dict(kw, behind=behind) if behind else kw
        self.asks, self.behind, self.defer, self.full, self.last = asks, behind, defer, full, last
        self.last_asks = False  # does the device expect the last position to need asks? (noted where `defer`)
        self._mark = asks.mark()

    def then(self, dev):
        """Wraps the device step of the last position (run while the verify travels)."""
        if self.defer:
            self.last_asks = any(self.asks.expected(dev) or [])
            return dev
        return self.asks.send(dev, self._mark, self.full, position=self.last)

    def merge(self, first, rows: list):
        """Merge the answers into the verify's rows (in place) and into `first` (the prefill's or pending
        position's answer, returned), in the order the asks went up."""
        for position, _ in self.behind:
            if position is None:
                first = self.asks.merge(first)
            else:
                rows[position] = self.asks.merge(rows[position])
        rows[-1] = self.asks.merge(rows[-1])  # the last position's ask in flight, if one went up
        return first

    @property
    def defers(self) -> bool:
        """Leave the last position to the next round: allowed, and the device expects it to need asks."""
        return self.defer and self.last_asks


__all__ = ["PipelinedAsks", "VerifyAsks", "position_candidates", "verify_candidates"]
