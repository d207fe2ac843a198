"""The device's estimate of what certification will ask (downlink/candidates.py), checked against the certifier
itself: when the cloud's scores equal the stand-in, the estimated candidates (margin 0) hold every id the certifier
asks about, and once they come back exactly scored it asks nothing; unsteered rows and rows under a plausibility
floor that the bound cannot reach expect no asks."""

from __future__ import annotations

import math

import torch

from pocketlm.steer.downlink.candidates import candidate_ids, expected_asks
from pocketlm.steer.downlink.certify import Certifier, DownlinkStats
from pocketlm.steer.downlink.topk import TopKLogits, truncate

V, K = 400, 8


class Recording:
    """A cloud that answers `exact` from known logits and records what it was asked."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.asked = logits, []

    def exact(self, rows, ids):
        self.asked.append((rows, ids))
        return [self.logits[r, torch.tensor(i)] for r, i in zip(rows, ids, strict=True)]


def _certify(logits: torch.Tensor, delta: torch.Tensor, kappa: float, top: TopKLogits) -> Recording:
    """Certify the closed form `b + kappa * delta` from `top` (what a top-k downlink sent) and return the asks."""
    cloud, known = top.dense(V)
    scores = cloud + kappa * delta
    n = logits.shape[0]
    source = Recording(logits)
    cert = Certifier(source, scores, cloud, known, top.bound - top.lse, top.lse, torch.full((n,), -math.inf),
                     torch.ones(n, dtype=torch.bool), DownlinkStats(), K)
    for p in range(n):
        cert.settle(p, scores[p])
    return source


def _lifting(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cloud logits and a delta that lifts many ids at once (what makes certification ask)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, V, generator=g) * 2
    delta = torch.randn(n, V, generator=g).clamp_min(0) * 3
    return logits, delta


def test_the_estimate_covers_every_ask_when_the_stand_in_is_the_cloud():
    logits, delta = _lifting(6, 0)
    kappa = 1.5
    top = truncate(logits, K)
    asked = _certify(logits, delta, kappa, top).asked
    assert sum(len(i) for _, ids in asked for i in ids) > 6 * 4  # the setting asks, so covering it means something
    plain = torch.log_softmax(logits, -1)
    counts = expected_asks(plain, delta, torch.full((6,), kappa), K, margin=0.0)
    cands = candidate_ids(delta, counts, 0, V)
    for rows, ids in asked:
        for r, i in zip(rows, ids, strict=True):
            assert set(i) <= set(cands[r]), (r, sorted(set(i) - set(cands[r])))
    # the verify's frame with those candidates exactly scored: nothing left to ask
    width = max(len(c) for c in cands)
    extra = torch.tensor([c + [int(top.ids[r, 0])] * (width - len(c)) for r, c in enumerate(cands)])
    with_cands = TopKLogits(torch.cat([top.ids, extra], 1), torch.cat([top.scores, logits.gather(1, extra)], 1),
                            top.bound, top.lse)
    assert _certify(logits, delta, kappa, with_cands).asked == []


def test_counts_grow_with_the_margin_and_respect_least_and_most():
    logits, delta = _lifting(4, 1)
    plain = torch.log_softmax(logits, -1)
    tight = expected_asks(plain, delta, torch.full((4,), 3.0), K, margin=0.0)
    strong = expected_asks(plain, delta, torch.full((4,), 3.0), K, margin=2.0)
    assert bool((strong >= tight).all()) and int(strong.sum()) > int(tight.sum())
    ids = candidate_ids(delta, strong, 5, 20)
    assert all(5 <= len(i) <= 20 and i == sorted(i) for i in ids)
    assert [len(i) for i in ids] == strong.clamp(5, 20).tolist()
    mapped = candidate_ids(delta, strong, 5, 20, to_cloud=lambda t: t + 1000)
    assert all(min(i) >= 1000 for i in mapped)


def test_unsteered_rows_and_unreachable_floors_expect_no_asks():
    logits, delta = _lifting(3, 2)
    plain = torch.log_softmax(logits, -1)
    kappa = torch.tensor([0.0, 2.0, 2.0])
    floor = torch.tensor([-math.inf, -math.inf, 0.0])  # row 2: every id outside the top-k falls under the floor
    counts = expected_asks(plain, delta, kappa, K, floor)
    assert counts[0] == 0 and counts[1] > 0 and counts[2] == 0
    assert candidate_ids(delta, torch.zeros(3, dtype=torch.long), 0, 10) == [[], [], []]
