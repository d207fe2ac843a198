"""Which ids a top-k verify should ask about up front, so that certifying its positions needs no further round trip.

Certification (certify.py) asks the cloud for every id outside the top-k whose fused upper bound, `bound + g_v`,
reaches the best known fused score. For the closed-form family `g_v = kappa * delta_v` (plus a row constant), so
the ids it will ask about are the ids of largest delta, as many as have `kappa * delta_v >= best - bound`. The
device can estimate that count before the cloud answers, with its own plain scores standing in for the cloud's
(as its draft does): the bound is about the k-th plain score, `best` about the best `plain + kappa * delta` among
the plain top-k; a margin covers the stand-in's error. A fixed count (16) left the positions where the context
lifts many tokens at once to an `exact` ask (or a `more`, then an `exact`): one more round trip each.

Exactness never depends on this estimate: an id it misses is asked for as before, an id it adds costs 8 bytes
down. What it sends up is what the asks would have sent (ids the delta favours, sorted by id, so the order says
nothing), only earlier; `topk:K:noexact` sends none.
"""

from __future__ import annotations

import torch

MARGIN = 1.0  # nats of slack on the stand-in's estimate of (best - bound)


def expected_asks(plain: torch.Tensor, delta: torch.Tensor, kappa: torch.Tensor, k: int,
                  floor: torch.Tensor | None = None, margin: float = MARGIN) -> torch.Tensor:
    """`[n]`: how many ids outside the top-k each row's certification is expected to ask about, with `plain`
    `[n, V]` (log-policy) standing in for the cloud. `kappa` `[n]` (0: the row is not steered); `floor` `[n]`: the
    rule's cloud floor on the stand-in (ids whose cloud score falls under it cannot be chosen), or None."""
    k = max(1, min(k, plain.shape[-1] - 1))
    top = plain.topk(k, dim=-1)
    bound = top.values[:, -1]
    lifted = kappa.to(plain.device).unsqueeze(-1) * delta
    best = (top.values + lifted.gather(-1, top.indices)).max(dim=-1).values
    outside = torch.ones_like(plain, dtype=torch.bool).scatter_(-1, top.indices, False)
    reach = outside & (bound.unsqueeze(-1) + lifted >= (best - margin).unsqueeze(-1))
    count = reach.sum(dim=-1)
    if floor is not None:
        count = torch.where(bound < floor.to(plain.device), torch.zeros_like(count), count)
    return count.where(kappa.to(plain.device) > 0, torch.zeros_like(count)).cpu()


def candidate_ids(delta: torch.Tensor, counts: torch.Tensor, least: int, most: int,
                  to_cloud=None) -> list[list[int]]:
    """Per row, its `clamp(count, least, most)` ids of largest delta (mapped by `to_cloud`), sorted by id."""
    want = counts.clamp(least, most)
    width = min(int(want.max()) if want.numel() else 0, delta.shape[-1])
    if width == 0:
        return [[] for _ in range(delta.shape[0])]
    top = delta.topk(width, dim=-1).indices.cpu()
    if to_cloud is not None:
        top = to_cloud(top)
    return [sorted(top[p, : int(want[p])].tolist()) for p in range(top.shape[0])]


__all__ = ["MARGIN", "candidate_ids", "expected_asks"]
