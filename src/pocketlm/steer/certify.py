"""Certify a greedy choice made from a truncated cloud step, and fetch what cannot be certified.

The rules fused a cloud log-policy in which every id outside the top-k sits at the bound (topk.py), so each
unknown id's fused score is an upper bound on its true one (the cloud enters every rule with coefficient 1).
For a row, let `best` be the highest fused score among *known* ids. Unknown ids scoring below `best` can never
win; the choice is certified when no unknown id reaches `best`. Otherwise the device asks the cloud for the
exact scores of exactly those ids (`PartialCloud.exact`), corrects their fused scores in place
(`+ exact - bound`, then the rule's cloud floor, e.g. the plausibility mask) and now knows them: the argmax of
the corrected row is the full-vocabulary argmax. A guard that refuses the winner removes it and the same
argument runs again on what is left. When so many ids are needed that asking costs more bytes than the whole row,
the row is fetched whole instead.

Sampling needs the whole distribution: `exact` mode fetches the full rows of the cloud rows being sampled
(the downlink saves nothing then), `truncated` mode samples among the top-k ids only (documented as such).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import PocketLMError
from .fusion import NEG

log = logging.getLogger(__name__)

# Asking for one id costs about 4 bytes down (its f32 logit) and ~7 up (its decimal id in the JSON list); a full
# row costs 4 bytes per column down. Ask while that is cheaper, else fetch the row.
ASK_BYTES_PER_ID, FULL_BYTES_PER_COLUMN = 11, 4
SAMPLING_MODES = ("exact", "truncated")


class NotCertifiable(PocketLMError):
    """The cloud cannot give exact scores for these ids (e.g. a text-only server that re-tokenises them)."""


@dataclass
class DownlinkStats:
    """Per generation: how often the top-k was enough, and what was fetched when it was not."""

    rows: int = 0              # cloud rows decided (greedy or sampled)
    certified: int = 0         # decided from the top-k alone
    exact_requests: int = 0    # rows that asked for exact scores of a few ids
    exact_ids: int = 0
    full_rows: int = 0         # rows fetched whole (sampling in exact mode, or too many ids to ask for)
    uncertified: int = 0       # the cloud could not answer: the best known token was taken (counted, logged)
    by_position: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "by_position"}
        d["certified_share"] = self.certified / self.rows if self.rows else None
        return d


class Certifier:
    """One step's truncated cloud rows. `scores` (fused) and `cloud` (the filled cloud log-policy the guards fall
    back to) are corrected in place; `known` marks ids whose cloud score is exact; `bound` `[n]` is each row's
    fill value (a log-probability); `floors` `[n]` the rules' cloud floors (-inf: none); `lse` `[n]` turns the
    cloud's raw scores into log-probabilities; `uses_cloud` `[n]` bool: rows whose scores contain the cloud."""

    def __init__(self, source, scores, cloud, known, bound, lse, floors, uses_cloud, stats: DownlinkStats):
        self.source, self.scores, self.cloud, self.known = source, scores, cloud, known
        self.bound, self.lse, self.floors, self.uses_cloud = bound, lse, floors, uses_cloud
        self.stats = stats
        self._asked: set[int] = set()
        self.failed: set[int] = set()

    def prepare(self, sampling) -> None:
        """Before the first choice: in sampling, fetch whole rows (exact) or drop the unknown ids (truncated)."""
        rows = self.uses_cloud.nonzero().flatten().tolist()
        self.stats.rows += len(rows)
        if sampling.temperature == 0 or not rows:
            return
        if sampling.downlink == "exact":
            try:
                self._fetch_full(rows)
                return
            except NotCertifiable as e:  # this cloud cannot send full rows: sample truncated, counted
                log.debug("full rows unavailable (%s): sampling among the top-k", e)
                self.stats.uncertified += len(rows)
        for p in rows:
            self._known_only(p)

    def _known_only(self, p: int) -> None:
        self.failed.add(p)
        for t in (self.scores, self.cloud):  # decide among the known ids only; never pick a bound
            t[p].masked_fill_(~self.known[p], NEG)

    def settle(self, p: int, row: torch.Tensor, exclude: list[int] = ()) -> None:
        """Make row `p`'s argmax (ignoring `exclude`) exact: `row` is `scores[p]` or `cloud[p]` (a view)."""
        if not bool(self.uses_cloud[p]) or p in self.failed:
            return
        live = row > NEG / 2
        if exclude:
            live[list(exclude)] = False
        known = self.known[p] & live
        best = row[known].max() if bool(known.any()) else torch.tensor(float("-inf"), device=row.device)
        need = (~self.known[p] & live & (row >= best)).nonzero().flatten()
        if need.numel() == 0:
            if p not in self._asked:
                self.stats.certified += 1
            self._asked.add(p)
            return
        self._asked.add(p)
        try:
            if need.numel() * ASK_BYTES_PER_ID > FULL_BYTES_PER_COLUMN * row.numel():
                self._fetch_full([p])
            else:
                exact = self.source.exact([p], [need.tolist()])[0]
                self.stats.exact_requests += 1
                self.stats.exact_ids += need.numel()
                self._correct(p, need, exact.to(self.scores.device, torch.float32) - self.lse[p])
        except NotCertifiable as e:
            self.stats.uncertified += 1
            self._known_only(p)
            log.debug("row %d not certified (%s): the best known token is taken", p, e)

    def _fetch_full(self, rows: list[int]) -> None:
        full = self.source.full(rows).to(self.scores.device, torch.float32)
        for i, p in enumerate(rows):
            ids = (~self.known[p]).nonzero().flatten()
            self._correct(p, ids, full[i, ids] - self.lse[p])
        self.stats.full_rows += len(rows)

    def _correct(self, p: int, ids: torch.Tensor, exact_lp: torch.Tensor) -> None:
        """Replace the bound by the exact cloud log-probability in the fused and the cloud rows of these ids."""
        self.scores[p, ids] += exact_lp - self.bound[p]
        dropped = exact_lp < self.floors[p]
        if bool(dropped.any()):
            self.scores[p, ids[dropped]] = NEG
        self.cloud[p, ids] = exact_lp
        self.known[p, ids] = True
