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

from ...errors import PocketLMError
from ..streams.protocol import CloudBackend


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

    def __getitem__(self, rows: torch.Tensor) -> TopKLogits:
        """Rows by index, like a dense `[B, V]` score tensor (the speculative verify selects rows this way)."""
        return self.select(rows.to(self.ids.device))

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
    """A cloud backend whose steps return `TopKLogits` (`truncates` = True). The engine calls `narrow` with the
    fused vocabulary width once; `exact`, `more` and `full` answer for the *current* step of the live rows."""

    truncates: bool
    columns: int

    def narrow(self, columns: int) -> None:
        """Bound and certify over the first `columns` ids (the engine's fused vocabulary)."""

    def exact(self, rows: list[int], ids: list[list[int]]) -> list[torch.Tensor]:
        """Exact scores (the units of `TopKLogits.scores`, before `lse`) of `ids[i]` for live row `rows[i]`."""

    def more(self, rows: list[int], depth: int) -> TopKLogits:
        """The `depth` best ids of these live rows (at least those; the engine merges what it knew) and the
        (depth+1)-th score as their new bound; a backend that cannot raises `certify.NotCertifiable`."""

    def full(self, rows: list[int]) -> torch.Tensor:
        """The full `[len(rows), columns]` score rows (exact sampling); a backend that cannot raises
        `certify.NotCertifiable`."""


class Truncating:
    """What every `PartialCloud` shares: it says it truncates, takes the engine's fused width, and answers for one
    position of its last verify (`at`). Its `exact` / `more` / `full` take `position=None` (the current step)
    or the index of a verified position."""

    truncates = True
    columns: int

    def narrow(self, columns: int) -> None:
        self.columns = columns

    def at(self, position: int, rows: torch.Tensor) -> PositionSource:
        return PositionSource(self, position, rows.tolist())


class PositionSource:
    """The certification source for one verified position and a subset of live rows: row p of the certifier
    is live row `rows[p]` of the cloud, asked about `position` of the last verify."""

    def __init__(self, cloud, position: int, rows: list[int]):
        self.cloud, self.position, self.rows = cloud, position, rows

    def exact(self, rows: list[int], ids: list[list[int]]) -> list[torch.Tensor]:
        return self.cloud.exact([self.rows[r] for r in rows], ids, position=self.position)

    def more(self, rows: list[int], depth: int) -> TopKLogits:
        return self.cloud.more([self.rows[r] for r in rows], depth, position=self.position)

    def full(self, rows: list[int]) -> torch.Tensor:
        return self.cloud.full([self.rows[r] for r in rows], position=self.position)


def truncate(logits: torch.Tensor, k: int, columns: int | None = None) -> TopKLogits:
    """The top-k of `[B, V]` logits over their first `columns` columns, the (k+1)-th value as the bound and the
    row's logsumexp over those columns (what a step server sends for a `topk` downlink)."""
    x = logits[:, :columns].float() if columns else logits.float()
    if not 1 <= k < x.shape[-1]:
        raise PocketLMError(f"top-k must be in 1..{x.shape[-1] - 1}, got {k}")
    vals, ids = x.topk(k + 1, dim=-1)
    return TopKLogits(ids[:, :k], vals[:, :k], vals[:, k], torch.logsumexp(x, dim=-1))


class TruncatedCloud(Truncating):
    """Any dense `CloudBackend` seen through a top-k downlink, in process: the reference for what a step
    server's `topk` format sends, used to test certification and to measure how often it holds."""

    def __init__(self, inner, k: int):
        self.inner, self.k = inner, k
        self.columns = inner.vocab_rows
        self._last: torch.Tensor | None = None
        self._verified: torch.Tensor | None = None

    @property
    def vocab_rows(self) -> int:
        return self.inner.vocab_rows

    @property
    def eos_token_ids(self) -> set[int]:
        return self.inner.eos_token_ids

    def cache_modes(self) -> tuple[str, ...]:
        return self.inner.cache_modes()

    def set_cache_mode(self, mode: str) -> None:
        self.inner.set_cache_mode(mode)

    def reserve(self, new_tokens: int) -> None:
        self.inner.reserve(new_tokens)

    def _cut(self, logits: torch.Tensor) -> TopKLogits:
        self._last = logits[:, : self.columns].float()
        return truncate(self._last, self.k)

    def prefill(self, prompts, expand=None) -> TopKLogits:
        return self._cut(self.inner.prefill(prompts, expand))

    def step(self, token_ids: torch.Tensor) -> TopKLogits:
        return self._cut(self.inner.step(token_ids))

    def extend(self, token_ids: torch.Tensor) -> list[TopKLogits]:
        rows = [x[:, : self.columns].float() for x in self.inner.extend(token_ids)]
        self._verified = torch.stack(rows, dim=1)  # [B, T, columns]: what `position=` asks read
        return [truncate(x, self.k) for x in rows]

    def rewind(self, drop: torch.Tensor) -> None:
        self.inner.rewind(drop)

    def keep(self, rows: torch.Tensor) -> None:
        self.inner.keep(rows)
        self._last = self._last[rows.to(self._last.device)]

    def release(self) -> None:
        self.inner.release()
        self._last = self._verified = None

    def _rows(self, position: int | None) -> torch.Tensor:
        return self._last if position is None else self._verified[:, position]

    def exact(self, rows: list[int], ids: list[list[int]], position: int | None = None) -> list[torch.Tensor]:
        src = self._rows(position)
        return [src[r, torch.tensor(i, dtype=torch.long, device=src.device)] for r, i in zip(rows, ids, strict=True)]

    def more(self, rows: list[int], depth: int, position: int | None = None) -> TopKLogits:
        return truncate(self.full(rows, position), depth)

    def full(self, rows: list[int], position: int | None = None) -> torch.Tensor:
        src = self._rows(position)
        return src[torch.tensor(rows, dtype=torch.long, device=src.device)]
