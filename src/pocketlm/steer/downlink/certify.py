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
from dataclasses import dataclass

import torch

from ...errors import PocketLMError
from ..fusion.formulas import NEG

log = logging.getLogger(__name__)

# Asking for one id costs about 4 bytes down (its f32 logit) and ~7 up (its decimal id in the JSON list); a full
# row costs 4 bytes per column down. Ask while that is cheaper, else fetch the row.
# At most MAX_ASK ids in one request (~30 KB of JSON, within any step server's message limit), and as many at once:
# one exact ask certifies the row in one round trip, which on a WAN costs more than its bytes (45 KB at most:
# under 20 ms at 20 Mbit/s against a 100 ms round trip; BENCHMARKS.md). More than ASK_LIMIT ids needed: first
# *deepen* the row (the cloud's next-ranked ids, DEEPEN times as many, 8 bytes each): that lowers the bound for
# every other id, sends nothing that depends on the device, and usually leaves few to ask.
ASK_BYTES_PER_ID, FULL_BYTES_PER_COLUMN, MAX_ASK, ASK_LIMIT, DEEPEN = 11, 4, 4096, 4096, 8
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
    excluded_ids: int = 0      # ids the cloud could not score (NaN): left out of a choice that then is not certified
    deepened: int = 0          # times a row's top-k was extended (PartialCloud.more)
    deepened_ids: int = 0
    uncertified: int = 0       # the cloud could not answer: the best known token was taken (counted, logged)
    ahead_requests: int = 0    # asks sent while their step was in flight (downlink/pipelined.py)
    ahead_ids: int = 0

    def add(self, counts: dict) -> None:
        """Add another generation's counts (an `as_dict()`), e.g. to total a benchmark's generations."""
        for key in self.__dataclass_fields__:
            setattr(self, key, getattr(self, key) + counts[key])

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["certified_share"] = self.certified / self.rows if self.rows else None
        return d


class Certifier:
    """One step's truncated cloud rows. `scores` (fused) and `cloud` (the filled cloud log-policy the guards fall
    back to) are corrected in place; `known` marks ids whose cloud score is exact; `bound` `[n]` is each row's
    fill value (a log-probability); `floors` `[n]` the rules' cloud floors (-inf: none); `lse` `[n]` turns the
    cloud's raw scores into log-probabilities; `uses_cloud` `[n]` bool: rows whose scores contain the cloud."""

    def __init__(self, source, scores, cloud, known, bound, lse, floors, uses_cloud, stats: DownlinkStats, k: int):
        self.source, self.scores, self.cloud, self.known = source, scores, cloud, known
        self.depth = [k] * scores.shape[0]  # how many of each row's best ids are known from the cloud's ranking
        self.bound, self.lse, self.floors, self.uses_cloud = bound, lse, floors, uses_cloud
        self.stats = stats
        self._asked: set[int] = set()
        self.failed: set[int] = set()
        self.excluded: set[int] = set()

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
        while True:
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
            if need.numel() <= ASK_LIMIT or not self._deepen(p, row.numel()):
                break
        try:
            if need.numel() > MAX_ASK or need.numel() * ASK_BYTES_PER_ID > FULL_BYTES_PER_COLUMN * row.numel():
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

    def _deepen(self, p: int, columns: int) -> bool:
        """Learn row p's next-ranked ids (up to DEEPEN x its depth) and lower its bound; False if it cannot."""
        depth = self.depth[p] * DEEPEN
        if depth * 2 > columns:
            return False
        try:
            top = self.source.more([p], depth)
        except NotCertifiable:
            return False
        lse = self.lse[p]
        ids, exact_lp = top.ids[0].to(self.scores.device), top.scores[0].to(self.scores.device, torch.float32) - lse
        fresh = ~self.known[p, ids]
        self._correct(p, ids[fresh], exact_lp[fresh])
        bound = top.bound[0].to(self.scores.device, torch.float32) - lse
        unknown = ~self.known[p]
        if bound < self.floors[p]:  # every remaining id now falls under the rule's cloud floor
            self.scores[p, unknown] = NEG
        else:
            self.scores[p, unknown] += bound - self.bound[p]
        self.cloud[p, unknown] = bound
        self.bound[p] = bound
        self.depth[p] = depth
        self.stats.deepened += 1
        self.stats.deepened_ids += int(fresh.sum())
        return True

    def _fetch_full(self, rows: list[int]) -> None:
        full = self.source.full(rows).to(self.scores.device, torch.float32)
        for i, p in enumerate(rows):
            ids = (~self.known[p]).nonzero().flatten()
            self._correct(p, ids, full[i, ids] - self.lse[p])
        self.stats.full_rows += len(rows)

    def _correct(self, p: int, ids: torch.Tensor, exact_lp: torch.Tensor) -> None:
        """Replace the bound by the exact cloud log-probability in the fused and the cloud rows of these ids. A NaN
        is an id the cloud cannot score (e.g. a text server's unnamed special token): it is left out of the choice
        and the row counts as uncertified."""
        missing = torch.isnan(exact_lp)
        if bool(missing.any()):
            if p not in self.excluded:
                self.excluded.add(p)
                self.stats.uncertified += 1
            self.stats.excluded_ids += int(missing.sum())
            exact_lp = exact_lp.masked_fill(missing, NEG)
        self.scores[p, ids] += exact_lp - self.bound[p]
        dropped = (exact_lp < self.floors[p]) | missing
        if bool(dropped.any()):
            self.scores[p, ids[dropped]] = NEG
        self.cloud[p, ids] = exact_lp
        self.known[p, ids] = True
