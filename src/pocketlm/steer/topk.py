"""A truncated cloud step: the k best ids per row, their scores, and a bound that no other id exceeds.

Why this is enough for exact greedy steering: every fusion rule scores a token as `b_v + g_v` (plus a row
constant), where `g_v` is computed on the device and does not depend on `b_v`, and the only rule that masks by
`b` (the plausibility mask) keeps a token iff `b_v >= max b + log a`. Filling every unknown `b_v` with the
bound therefore gives each unknown token an *upper bound* on its fused score; if the best known token beats
every upper bound, it is the full-vocabulary argmax (`certify.py`). When it does not, the device asks the
cloud for the exact scores of the few ids whose upper bound reaches it (`PartialCloud.exact`).

A cloud backend whose `prefill` / `step` return `TopKLogits` instead of a dense `[B, V]` tensor is a
`PartialCloud`: the step server's `topk` downlink (`remote.py`) and the OpenAI-compatible backend (top
logprobs) are two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..errors import PocketLMError
from .protocol import CloudBackend


@dataclass
class TopKLogits:
    """`ids` `[B, k]` (cloud ids, distinct per row), `scores` `[B, k]` fp32 (logits or log-probs), `bound` `[B]`:
    no id outside a row's `ids` scores above it; `lse` `[B]`: the log-normaliser of the row's full score vector
    over the client's columns, so `scores - lse` are log-probabilities (0 when `scores` are log-probs already)."""

    ids: torch.Tensor
    scores: torch.Tensor
    bound: torch.Tensor
    lse: torch.Tensor

    def __post_init__(self):
        b, k = self.ids.shape
        if self.scores.shape != (b, k) or self.bound.shape != (b,) or self.lse.shape != (b,):
            raise PocketLMError(f"malformed top-k scores: ids {tuple(self.ids.shape)}, scores "
                                f"{tuple(self.scores.shape)}, bound {tuple(self.bound.shape)}, lse {tuple(self.lse.shape)}")

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: torch.Tensor) -> TopKLogits:
        return TopKLogits(self.ids[rows], self.scores[rows], self.bound[rows], self.lse[rows])

    def dense(self, columns: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-policy `[B, columns]` with every unknown id at the bound, known-mask `[B, columns]`).

        Ids at or past `columns` (padding rows the client does not fuse over) are dropped."""
        device = device or self.scores.device
        ids = self.ids.to(device)
        ids = torch.where(ids < columns, ids, torch.full_like(ids, columns))  # one spare column takes the dropped
        lse = self.lse.to(device, torch.float32).unsqueeze(-1)
        filled = (self.bound.to(device, torch.float32).unsqueeze(-1) - lse).expand(-1, columns + 1).clone()
        filled.scatter_(-1, ids, self.scores.to(device, torch.float32) - lse)
        known = torch.zeros(self.rows, columns + 1, dtype=torch.bool, device=device).scatter_(-1, ids, True)
        filled, known = filled[:, :columns], known[:, :columns]
        return filled, known


@runtime_checkable
class PartialCloud(CloudBackend, Protocol):
    """A cloud backend whose steps return `TopKLogits`. The engine sets `columns` (the fused vocabulary width)
    before the first generation; `exact` and `full` answer for the *current* step of the live rows."""

    columns: int

    def exact(self, rows: list[int], ids: list[list[int]]) -> list[torch.Tensor]:
        """Exact scores (the units of `TopKLogits.scores`, before `lse`) of `ids[i]` for live row `rows[i]`."""

    def full(self, rows: list[int]) -> torch.Tensor:
        """The full `[len(rows), columns]` score rows (exact sampling); a backend that cannot raises
        PocketLMError naming the truncated mode."""
