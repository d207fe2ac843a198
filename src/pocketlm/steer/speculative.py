"""Speculative steering: the device drafts up to K tokens alone, the cloud scores them all in one call, and the
device keeps exactly what steered decoding would have written.

Why it is exact (greedy). A round starts with the last chosen token z, which no stream has consumed. The device
steps z and drafts y_1..y_L from a stand-in for the fused scores that needs no cloud (`FusionRule.draft`: the
cloud's log-policy replaced by the device's plain one), every draft token passing the guards as if it were
written. The cloud appends [z, y_1..y_L] and returns scores after each (`extend`: one round trip). Then, position
by position, the *true* fused scores are computed from the cloud's and the device's real scores with every guard
and certification, exactly as the sequential loop would at that position: the choice t_j is recorded; if it
equals y_{j+1} the next position is checked, otherwise t_j becomes the next round's z. Every recorded token is
therefore the sequential choice given the same history, and rules with per-row state (adaptive kappa, the
AdaCoSteer gate) are fused at exactly the sequential positions, so their state advances as it would. The
rejected suffix is rewound from both caches.

Sampling: the standard speculative sampling rule (accept y with min(1, p(y)/q(y)), else draw from the
normalised residual max(0, p - q)) keeps the output distribution equal to sequential steering. A guarded row's
distribution is a rejection chain, not a closed form, so sampled rows with guards draft nothing (they decode
one token per round, exactly as before).

SpecSteer (`rules.SpecSteer`) runs in the same loop with its own acceptance: its ratio test instead of equality.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from ..errors import PocketLMError
from .cloud_step import CloudStep
from .deferred import Pending, may_defer, pending_choice
from .drafting import Ahead, Drafting, draft_ahead, rows_of
from .pipelined import PipelinedAsks, VerifyAsks, verify_candidates
from .plan import Choice, DecodePlan
from .streams.device import DeviceScores

log = logging.getLogger(__name__)

DRAFTS = ("fused", "ctx")
MAX_SPECULATE = 32


@dataclass(frozen=True)
class Speculation:
    """`k`: draft tokens per round (0: off); `draft`: the draft policy — `fused` (each rule's device-only
    stand-in, `FusionRule.draft`) or `ctx` (the device with the context, as SpecSteer drafts); `ahead`: draft the
    next round during the verify in flight (drafting.py; greedy, with the overlap on)."""

    k: int = 0
    draft: str = "fused"
    ahead: bool = False

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 <= self.k <= MAX_SPECULATE:
            raise PocketLMError(f"--speculate must be an integer in 0..{MAX_SPECULATE}, got {self.k!r}")
        if self.draft not in DRAFTS:
            raise PocketLMError(f"draft policy must be one of {', '.join(DRAFTS)}, got {self.draft!r}")


def draft_lengths(methods, spec: Speculation, sampling) -> list[int]:
    """Per row: SpecSteer drafts its own length; other rows `spec.k`, none when sampled with guards."""
    out = []
    for m in methods:
        k = getattr(m.rule, "draft_length", None) or spec.k
        if sampling.temperature > 0 and m.guards and not hasattr(m.rule, "accepts"):
            k = 0
        out.append(k if m.cloud_prompt else 0)
    return out


class SpeculativeRound:
    """The state of one speculative `generate()`: the engine's streams and plan, plus the draft bookkeeping."""

    def __init__(self, engine, plan: DecodePlan, spec: Speculation, sampling, gen, lengths: list[int], on_token,
                 ignore_eos: bool, max_new_tokens: int):
        self.e, self.plan, self.spec, self.sampling, self.gen = engine, plan, spec, sampling, gen
        self.k_of = torch.tensor(lengths, dtype=torch.long)
        self.on_token, self.ignore_eos, self.max_new = on_token, ignore_eos, max_new_tokens
        self.dev_device = next(engine.device_model.parameters()).device
        # rounds = cloud calls after the prefill; row_round_trips: per row, every cloud call it waited for, the
        # prefill included (a batched call serves every live row); tokens: filled in at the end
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0, "row_round_trips": len(plan.gens), "tokens": 0,
                      "ahead_rounds": 0, "ahead_hits": 0, "ahead_drafted": 0, "deferred": 0, "deferred_hits": 0}
        self._carry: Ahead | None = None  # the next round's draft, written during the last verify
        self._estimates: dict[str, float] = {}  # running means (s) of a verify and of a device step
        self._pipelined: PipelinedAsks | None = None  # asks sent while their verify is in flight
        self.pending: Pending | None = None  # a bonus position left to the next round (deferred.py)
        self._guessed: torch.Tensor | None = None  # a pending round's drafted token for its first position
        self.first_behind = False  # the first position's asks go behind the first verify (set by the engine)
        for g in plan.gens:
            g.round_trips = 1  # the prefill

    # -- one decision at one position ----------------------------------------------------------------
    def decide(self, answer, dev: DeviceScores, pos: torch.Tensor, source, drafted=None):
        """CloudStep -> fuse -> certify -> choose for the rows at live positions `pos`."""
        e, plan = self.e, self.plan
        live = plan.live[pos]
        step = CloudStep.of(None if answer is None else answer[pos.to(self._device_of(answer))], e.align,
                            self.dev_device)
        view = e._view(step, rows_of(dev, pos), live)
        fused = plan.fuse(view, e.align.size)
        certifier = plan.certify(fused, view, step.top, source, self.sampling)
        choice = plan.choose(fused, self.sampling, self.gen, e.align.to_device, certifier, live=live, drafted=drafted)
        return step, view, fused, choice

    @staticmethod
    def _device_of(answer) -> torch.device:
        return answer.ids.device if hasattr(answer, "ids") else answer.device

    def record(self, step: CloudStep, tokens: torch.Tensor, blocked: set[int], steered, live) -> torch.Tensor:
        e = self.e
        cloud_ids, dev_ids = e.align.to_cloud(tokens), e.align.to_device(tokens)
        is_eos = e._eos_check(cloud_ids.tolist(), dev_ids.tolist(), step, self.plan)
        return self.plan.record(Choice(tokens, blocked), dev_ids.tolist(), steered, is_eos, self.ignore_eos,
                                self.on_token, live=live)

    # -- drafting ------------------------------------------------------------------------------------
    def is_eos(self, tok: torch.Tensor) -> torch.Tensor:
        e = self.e
        cloud_ids, dev_ids = e.align.to_cloud(tok).tolist(), e.align.to_device(tok).tolist()
        return torch.tensor([c in e.cloud_eos or d in e.device_eos for c, d in zip(cloud_ids, dev_ids, strict=True)],
                            dtype=torch.bool)

    def timed_device(self, device, ids: torch.Tensor) -> DeviceScores:
        return self.e.clock.timed("device", device.step, ids.to(self.dev_device))

    # -- one round -----------------------------------------------------------------------------------
    def round(self, z: torch.Tensor | None, cloud, device, prefilled=None):
        """Consume z, draft, verify, record; returns (next z per live row, finished `[B]`). The first round has
        no z: it drafts from the prefill's scores (`prefilled` = (cloud answer, device scores)), so the first
        token is drafted and verified like every other (SpecSteer drafts from the start). A round after one that
        left its bonus position undecided (deferred.py) starts the same way from that position, z unused."""
        e, plan, n = self.e, self.plan, self.plan.live.numel()
        pending, self.pending = self.pending, None
        if pending is not None:
            prefilled = (pending.answer, pending.dev)
        emitted = torch.tensor([len(plan.gens[r].token_ids) for r in plan.live.tolist()], dtype=torch.long)
        # a pending round drafts its first position's token on top of K: as many ids as a round behind a decided z
        budget = torch.minimum(self.k_of[plan.live] + (pending is not None),
                               (self.max_new - emitted - 1).clamp_min(0))
        no_drafts = torch.zeros(n, 0, dtype=torch.long), torch.zeros(n, dtype=torch.long), []
        if int(budget.max()) == 0:  # nobody drafts: one ordinary step
            if pending is not None and pending.ahead is not None:
                self._drop_ahead(pending.ahead, device)
            if prefilled is not None:
                return self._verify([prefilled[0]], [prefilled[1]], *no_drafts, cloud, device, offset=1)
            asks = self._asks(cloud)
            mark = asks.mark()
            cl, dev = e.clock.step(cloud, e.align.to_cloud(z), device, e.align.to_device(z).to(self.dev_device),
                                   e.overlap, then=lambda d: asks.send(d, mark))
            cl = asks.merge(cl)
            self._called()
            return self._verify([cl], [dev], *no_drafts, cloud, device, offset=1)
        carry, self._carry = self._carry, None
        ask_first: list[list[int]] | None = None
        if pending is not None:
            d, ask_first = self._pending_draft(pending, budget, device)
        elif carry is not None:  # this round's draft was begun during the last verify, behind z (stepped already)
            d = carry.resumed().run(device)
        else:
            last_real = z.cpu().clone() if z is not None else torch.zeros(n, dtype=torch.long)
            dev0 = self.timed_device(device, e.align.to_device(z)) if prefilled is None else prefilled[1]
            d = Drafting(self, dev0, budget, last_real).run(device)
        drafts, lengths = d.drafts, d.lengths
        k_used = drafts.shape[1]
        head = [] if prefilled is not None else [z.cpu().view(-1, 1)]
        ids = torch.cat(head + [drafts], dim=1)
        lead = len(head)
        for j in range(k_used):  # rows that drafted fewer: fillers (their last real token), rewound after
            short = lengths <= j
            ids[short, lead + j] = ids[short, lead + j - 1] if lead + j > 0 else d.last_real[short]
        last = e.align.to_device(ids[:, -1]).to(self.dev_device)
        cloud_ids = e.align.to_cloud(ids)
        nxt = self._ahead_budget(emitted, lengths, k_used)
        asks = self._asks(cloud)
        if ask_first is None and prefilled is not None and self.first_behind:
            # the first round's first position (its asks did not follow the open): they ride behind this verify
            ask_first = asks.expected(prefilled[1]) if asks.on else None
        self.first_behind = False
        kw, behind = verify_candidates(e, plan, asks, cloud, d.dev_seq, lengths, cloud_ids.shape[1],
                                       0 if prefilled is None else 1)
        va = VerifyAsks(asks, kw, behind, first=ask_first, defer=may_defer(self, cloud),
                        full=[int(length) == k_used for length in lengths.tolist()], last=cloud_ids.shape[1] - 1)
        ahead = None
        if nxt is not None:
            cl, (dev_last, ahead) = self._verify_beside(cloud, cloud_ids, lambda stop: draft_ahead(
                self, device, last, drafts, nxt, stop, va.then), va.kw)
        else:
            cl, dev_last = e.clock.step(cloud, cloud_ids, device, last, e.overlap, cloud_op="extend", then=va.then,
                                        **va.kw)
        first = va.merge(prefilled[0] if prefilled is not None else None, cl)
        self._called()
        self.stats["drafted"] += int(lengths.sum())
        for p, r in enumerate(plan.live.tolist()):
            plan.gens[r].drafted_tokens += int(lengths[p])
        answers = cl if prefilled is None else [first] + cl
        return self._verify(answers, d.dev_seq + [dev_last], drafts, lengths, d.q_seq, cloud, device,
                            offset=0 if prefilled is None else 1, ahead=ahead, defer=va.defers)

    def _pending_draft(self, pending: Pending, budget: torch.Tensor, device) -> tuple[Drafting, list[list[int]]]:
        """The draft of a round that starts at an undecided position: its token is chosen from the real cloud
        row there (deferred.py, `pending_choice`); a draft written behind the same guess during the last verify is
        resumed, any other is rewound. Also returns the ids to ask about there, behind the verify."""
        n = self.plan.live.numel()
        tok, ok, ask_ids = pending_choice(self, pending)
        self.stats["deferred"] += 1
        self._guessed = torch.where(ok, tok, torch.full_like(tok, -1))
        a = pending.ahead
        if a is not None and bool(ok.all()) and torch.equal(tok, a.guess.cpu()):
            self.stats["ahead_hits"] += 1
            return a.behind(pending.dev).run(device), ask_ids
        if a is not None:
            self._drop_ahead(a, device)
        d = Drafting(self, pending.dev, budget, torch.zeros(n, dtype=torch.long))
        d.put(torch.arange(n), tok, ok)
        return d.run(device), ask_ids

    def _drop_ahead(self, ahead: Ahead, device) -> None:
        """Rewind the device steps a draft written ahead took (it was not kept)."""
        device.rewind(torch.full((self.plan.live.numel(),), ahead.drafting.stepped).to(self.dev_device))

    def _asks(self, cloud) -> PipelinedAsks:
        if self._pipelined is None:
            self._pipelined = PipelinedAsks(self.e, self.plan, cloud, self.sampling)
        return self._pipelined

    def _verify_beside(self, cloud, cloud_ids, work, cloud_kw: dict):
        """The verify in the worker and `work(stop)` here: `stop()` says not to start another device step, because
        the verify has returned or (from the running means of earlier verifies and device steps) a step started
        now would end after it; a step that overruns the verify delays the next round."""
        clock = self.e.clock
        cloud_s, dev_s, dev_n = (clock.timings.get("cloud", 0.0), clock.timings.get("device", 0.0),
                                 clock.calls.get("device", 0))
        t_sent = time.perf_counter()
        est = self._estimates
        asks = self._asks(cloud)

        def stop(fut) -> bool:
            # an ask in flight (sent a device step after the verify) answers about that much after it: the device
            # keeps drafting until then instead of idling while the answer trails the rows
            ask_at = asks.sent_at
            if "verify" not in est or "step" not in est:
                return fut.done()
            due = (t_sent if ask_at is None else ask_at) + est["verify"]  # the ask leaves after the verify
            if fut.done() and ask_at is None:
                return True
            return time.perf_counter() + est["step"] > due

        out = clock.beside(cloud, cloud_ids, lambda fut: work(lambda: stop(fut)), "extend", **cloud_kw)
        steps = clock.calls.get("device", 0) - dev_n
        for key, value in (("verify", clock.timings.get("cloud", 0.0) - cloud_s),
                           ("step", (clock.timings.get("device", 0.0) - dev_s) / steps if steps else None)):
            if value is not None:
                est[key] = value if key not in est else 0.7 * est[key] + 0.3 * value
        return out

    def _ahead_budget(self, emitted: torch.Tensor, lengths: torch.Tensor, k_used: int) -> torch.Tensor | None:
        """The next round's budget if this round may draft it during the verify (greedy, overlap on, every row
        drafted in full: only then can the whole batch go on from one guess); else None."""
        e = self.e
        if not (self.spec.ahead and e.overlap and k_used and self.sampling.temperature == 0):
            return None
        if not bool((lengths == k_used).all()):
            return None
        nxt = torch.minimum(self.k_of[self.plan.live], (self.max_new - (emitted + k_used + 1) - 1).clamp_min(0))
        return nxt if int(nxt.min()) > 0 else None  # every row drafts again: no row can leave the batch

    def _called(self) -> None:
        """One cloud call served every live row."""
        self.stats["rounds"] += 1
        self.stats["row_round_trips"] += self.plan.live.numel()
        for r in self.plan.live.tolist():
            self.plan.gens[r].round_trips += 1

    def _verify(self, answers, devs, drafts, lengths, q_seq, cloud, device, offset: int, ahead: Ahead | None = None,
                defer: bool = False):
        """Decide positions 0..K' in order (`answers[j]`: the cloud after the j-th kept token; answers before
        `offset` are the current step's, the rest come from the verify, position j - offset). `defer`: a row that
        accepts its whole draft leaves the last position to the next round (deferred.py; one live row)."""
        e, plan, n = self.e, self.plan, self.plan.live.numel()
        k_used = drafts.shape[1]
        undecided = torch.ones(n, dtype=torch.bool)
        finished = torch.zeros(n, dtype=torch.bool)
        accepted = torch.zeros(n, dtype=torch.long)
        z = torch.zeros(n, dtype=torch.long)
        starts = [len(plan.gens[r].token_ids) for r in plan.live.tolist()]
        for j in range(k_used + 1):
            pos = undecided.nonzero().flatten()
            if pos.numel() == 0:
                break
            if defer and j == k_used and k_used > 0:
                self.pending = Pending(answers[j], devs[j])
                break
            source = cloud.at(j - offset, pos) if e.partial and j >= offset else cloud
            t0 = time.perf_counter()  # the accepted drafts before j are recorded already: the guards see them
            step, view, fused, choice = self.decide(answers[j], devs[j], pos, source)
            tokens = self._accept(choice, view, fused, drafts, lengths, q_seq, pos, j)
            e.clock.add("fusion", time.perf_counter() - t0)
            done = self.record(step, tokens, choice.blocked, fused.steered, plan.live[pos])
            if j == 0 and self._guessed is not None:  # was the pending position's drafted token its choice?
                self.stats["deferred_hits"] += int((tokens.cpu() == self._guessed[pos]).sum())
                self._guessed = None
            for i, p in enumerate(pos.tolist()):
                hit = j < int(lengths[p]) and int(tokens[i]) == int(drafts[p, j])
                if bool(done[i]):
                    undecided[p], finished[p] = False, True
                elif hit:
                    accepted[p] += 1
                else:
                    undecided[p], z[p] = False, tokens[i]
        for p, r in enumerate(plan.live.tolist()):
            a, length = int(accepted[p]), int(lengths[p])
            if length > a and not bool(finished[p] and a == length):
                rejected = e.align.to_device(drafts[p, a:length]).tolist()
                plan.gens[r].rejected.append((starts[p] + a, rejected))
        self.stats["accepted"] += int(accepted.sum())
        if k_used:
            drop = (k_used - accepted).clamp_min(0)
            cloud.rewind(drop)
            device.rewind((drop + self._settle_ahead(ahead, z, accepted, lengths, finished)).to(self.dev_device))
        return z, finished

    def _settle_ahead(self, ahead: Ahead | None, z, accepted, lengths, finished) -> int:
        """Keep the draft written during the verify for the next round if it guessed right; else the number of
        device steps it took, to rewind with the rejected suffix (a rewind drops the newest positions)."""
        if ahead is None:
            return 0
        self.stats["ahead_rounds"] += 1
        self.stats["ahead_drafted"] += int(ahead.drafting.lengths.sum())
        if self.pending is not None:  # the bonus position is undecided: the next round compares its own guess
            self.pending.ahead = ahead
            return 0
        if ahead.hits(z, accepted, lengths, finished):
            self.stats["ahead_hits"] += 1
            self._carry = ahead
            return 0
        return ahead.drafting.stepped

    def _accept(self, choice, view, fused, drafts, lengths, q_seq, pos, j) -> torch.Tensor:
        """The token each row at this position records: the true choice, or (sampling, SpecSteer) the draft
        token when the acceptance rule keeps it."""
        tokens = choice.tokens.clone().cpu()
        drafting = torch.tensor([j < int(lengths[p]) for p in pos.tolist()], dtype=torch.bool)
        if not bool(drafting.any()):
            return tokens
        y = drafts[pos, min(j, drafts.shape[1] - 1)]
        for g, gpos in self.plan._positions(self.plan.live[pos]):
            rows = gpos[drafting[gpos]]
            if rows.numel() == 0:
                continue
            accepts = getattr(g.rule, "accepts", None)
            if accepts is not None:  # SpecSteer's ratio test
                ok = accepts(view.select(rows.to(view.cloud.device)), y[rows])
                tokens[rows[ok]] = y[rows[ok]]
            elif self.sampling.temperature > 0:
                tokens[rows] = self._speculative_sample(fused.scores, q_seq[j], y, pos, rows)
        return tokens

    def _speculative_sample(self, scores, q_full, y, pos, rows) -> torch.Tensor:
        """Accept y with min(1, p(y)/q(y)), else draw from the normalised residual max(0, p - q)."""
        p = self.sampling.probs(scores[rows.to(scores.device)])
        q = q_full[pos[rows].to(q_full.device)]
        yy = y[rows].to(p.device).view(-1, 1)
        py, qy = p.gather(-1, yy).view(-1), q.gather(-1, yy).view(-1)
        u = torch.rand(py.shape, generator=self.gen, device=p.device)
        keep = u * qy <= py  # u < p/q without dividing by a zero q
        out = yy.view(-1).clone()
        if not bool(keep.all()):
            resid = (p - q).clamp_min(0)[~keep]
            mass = resid.sum(-1, keepdim=True)
            resid = torch.where(mass > 0, resid / mass.clamp_min(1e-30), p[~keep])
            out[~keep] = torch.multinomial(resid, 1, generator=self.gen).view(-1)
        return out.cpu()


def acceptance(stats: dict) -> dict:
    """Summary numbers of a speculative run: the share of draft tokens accepted, and the tokens a row got per
    cloud round trip it waited for, the prefill's included (1.0 without speculation)."""
    out = dict(stats)
    out["acceptance"] = stats["accepted"] / stats["drafted"] if stats["drafted"] else None
    out["tokens_per_round_trip"] = stats["tokens"] / stats["row_round_trips"] if stats["row_round_trips"] else None
    return out


__all__ = ["DRAFTS", "MAX_SPECULATE", "SpeculativeRound", "Speculation", "acceptance", "draft_lengths"]
