"""The one stream protocol of the steering engine.

Every source of next-token scores the decoder drives — the in-process cloud backend, the dynamic- and the
static-cache streams, the device's stream pair, and a cloud behind a network — is a `Stream`: rows decoded in
lockstep, prefilled once, stepped with one chosen token per live row (or extended by a speculative draft and
rewound past its rejected part), trimmed when rows finish. The decoder only ever calls these methods, so
a new kind of cloud is one more implementation, never a new branch in
the decode loop.

A `CloudBackend` is a stream that also says what its vocabulary and end tokens are and which KV-cache modes it
can decode with. It receives token ids only (the public prompt's ids once, then one chosen id per row per
step): the private context never appears in its arguments.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

import torch

PromptT = TypeVar("PromptT", contravariant=True)
ScoresT = TypeVar("ScoresT", covariant=True)


@runtime_checkable
class Stream(Protocol[PromptT, ScoresT]):
    """Rows decoded in lockstep. For a language-model stream PromptT is `list[int]` and ScoresT a `[B, V]`
    fp32 logits tensor; the device pair takes `(plain, ctx)` prompt pairs and returns both streams' logits."""

    def reserve(self, new_tokens: int) -> None:
        """Sizing hint before `prefill`: how many tokens will be decoded (a static cache sizes itself once)."""

    def prefill(self, prompts: list[PromptT], expand: list[int] | None = None) -> ScoresT:
        """Start one row per entry of `expand` (default: one per prompt; `expand[i]` = index of row i's
        prompt, so rows sharing a prompt pay for its prefill once); return each row's next-token scores."""

    def step(self, token_ids: torch.Tensor) -> ScoresT:
        """Append one chosen token id per live row (`[B]`); return the next scores."""

    def extend(self, token_ids: torch.Tensor) -> list[ScoresT]:
        """Append `T` tokens per live row (`[B, T]`, one call: a speculative draft to verify); return the scores
        after each appended position (`T` answers, each what `step` returns)."""

    def rewind(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` appended tokens of live row i (`[B]`, the rejected part of a draft)."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) only these live rows; finished rows are dropped."""

    def release(self) -> None:
        """End the generation and free per-generation state (buffers may be kept for reuse)."""


@runtime_checkable
class CloudBackend(Stream[list[int], torch.Tensor], Protocol):
    """prefill/step return next-token logits `[B, vocab_rows]` for each live row."""

    vocab_rows: int
    eos_token_ids: set[int]

    def cache_modes(self) -> tuple[str, ...]:
        """The KV-cache modes this backend can decode with; the first is what 'auto' picks. A backend with no
        choice (a remote server) names its one mode."""

    def set_cache_mode(self, mode: str) -> None:
        """Decode the next generations with `mode` ('auto' or one of `cache_modes()`); anything else raises."""
