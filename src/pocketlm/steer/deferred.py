"""A position decided a round later, so that its certification asks ride behind the next verify.

Why. With the top-k downlink a speculative verify carries its drafted positions' likely asks up front, but two
positions have no device scores when their request leaves: the first (the device prefills the longer, private
prompt while the `open` travels, so its asks could only follow the open once that is done: measured, a full
round trip per generation) and a verify's last, bonus position (scored while the verify travels, so its asks
follow a device step later). Where the device expects such a position to need asks it is left undecided, and the
next round starts from it the way the first round starts from the prefill. Its cloud row (top-k) and device
scores are at hand, so
- its token is drafted from the *real* cloud row: fused with the cloud's known scores, and for the ids outside the
  top-k the device's plain score standing in for the cloud's (capped by the bound), then the guards;
- exactly the ids certification will ask about there (every unknown id whose fused upper bound reaches the best
  known score; at most MAX_ASK) go up right behind the next verify, as an `exact` about the server's `last` row (a
  server that announces `last_after_rewind` keeps it at each row's newest kept row after a rewind; before any
  rewind it is the open's row);
- the position is then decided in that round's `_verify` as position 0, with every guard and full certification,
  before the draft after it is judged: the tokens are those of sequential decoding.
That round appends as many ids as one that starts from a decided token (the guess plus K drafts), so a right guess
costs nothing; a wrong one keeps a single token that round, like a draft rejected at once.

Only where this is exact and useful: greedy, one live row (the rows of a batch would all have to defer together),
a remote top-k cloud that announces the feature, and rules without per-row state or their own acceptance (fusing a
position twice would advance an adaptive kappa twice; SpecSteer's bonus is its fused choice, not a ratio-tested
draft). Elsewhere the bonus position's asks go up in flight as before (pipelined.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cloud_step import CloudStep
from .downlink.certify import MAX_ASK
from .drafting import Ahead
from .fusion.formulas import NEG
from .streams.device import DeviceScores


@dataclass
class Pending:
    """An undecided bonus position: the cloud's answer there (live rows) and the device's scores; `ahead`: the
    draft written behind a guessed token for it during the verify (kept if the guess is the drafted token)."""

    answer: object
    dev: DeviceScores
    ahead: Ahead | None = None


def may_defer(rnd, cloud) -> bool:
    """Can this round leave its bonus position to the next one (see the module docstring)?"""
    e, plan = rnd.e, rnd.plan
    if not (getattr(cloud, "defers_bonus", False) and e.partial and rnd._asks(cloud).on):  # greedy, overlap on
        return False
    if plan.live.numel() != 1:
        return False
    return all(getattr(g.rule, "state", None) is None and not hasattr(g.rule, "accepts")
               for g, _ in plan._positions())


def pending_choice(rnd, pending: Pending) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """At the pending position, per live row: the token to draft (fused vocabulary, guarded),
    whether the guards left one, and the cloud ids certification will ask about there (empty: none)."""
    e, plan = rnd.e, rnd.plan
    live = plan.live
    step = CloudStep.of(pending.answer, e.align, rnd.dev_device)
    view = e._view(step, pending.dev, live)
    fused = plan.fuse(view, e.align.size)  # stateless rules only (may_defer): fusing here changes nothing
    asks: list[list[int]] = []
    for p in range(live.numel()):
        row = fused.scores[p]
        alive = row > NEG / 2
        known = view.known[p] & alive
        if not bool(fused.uses_cloud[p]) or not bool(known.any()):
            asks.append([])
            continue
        need = (~view.known[p] & alive & (row >= row[known].max())).nonzero().flatten()
        asks.append(sorted(e.align.to_cloud(need[:MAX_ASK].cpu()).tolist()) if need.numel() else [])
    # the guess: an id outside the top-k enters with the device's plain score standing in for its cloud score (as
    # in a draft), capped by the bound; the cloud enters every rule with coefficient 1, so that is a shift
    unknown = ~view.known & fused.uses_cloud.to(view.known.device).view(-1, 1)
    if view.plain is not None:
        lower = (view.cloud - view.plain.to(view.cloud.device)).clamp_min(0)
        fused.scores = torch.where(unknown & (fused.scores > NEG / 2), fused.scores - lower, fused.scores)
    else:
        fused.scores = fused.scores.masked_fill(unknown, NEG)
    choice = plan.choose(fused, rnd.sampling, rnd.gen, e.align.to_device, live=live)
    ok = torch.tensor([p not in choice.blocked for p in range(live.numel())], dtype=torch.bool)
    return choice.tokens.cpu(), ok, asks


__all__ = ["Pending", "may_defer", "pending_choice"]
