"""The device's two streams — without and with the private context — as one `Stream`.

Rows are requests: each has a plain prompt (the public query, as the cloud sees it) and/or a context prompt
(context + query), and one chosen token per step advances both. By default the two run as ONE batched forward
(rows [plain..., ctx...], left padded), which costs about one device pass per token instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kvmode import make_stream
from .prefill import unique_prompts

DevicePrompt = tuple[list[int] | None, list[int] | None]  # (plain, ctx) token ids of one request


@dataclass
class DeviceScores:
    """Next-token logits of the device with / without the private context (None where not running)."""

    plain: torch.Tensor | None
    ctx: torch.Tensor | None


class DeviceStreams:
    """`Stream[DevicePrompt, DeviceScores]`: device plain and device ctx, one batched forward (`fused`) or two."""

    def __init__(self, model, pad_id: int, fused: bool = True, kv: str = "auto"):
        self.fused = fused
        self.a = make_stream(model, pad_id, kv)
        self._b = self.a if fused else make_stream(model, pad_id, kv)
        self.b = self._b
        self.has_plain = self.has_ctx = False
        self.n = 0

    def reserve(self, new_tokens: int) -> None:
        self.a.reserve(new_tokens)
        self._b.reserve(new_tokens)

    def prefill(self, prompts: list[DevicePrompt], expand: list[int] | None = None) -> DeviceScores:
        """Every request has the same kind of prompts (all with a plain prompt, all with a context, or both)."""
        if expand is not None:
            prompts = [prompts[e] for e in expand]
        plain = [p for p, _ in prompts] if prompts and prompts[0][0] is not None else None
        ctx = [c for _, c in prompts] if prompts and prompts[0][1] is not None else None
        if (plain is not None and any(p is None for p in plain)) or (ctx is not None and any(c is None for c in ctx)):
            raise ValueError("every device row needs the same kind of prompts")
        self.has_plain, self.has_ctx = plain is not None, ctx is not None
        self.b = self._b
        pu, pe = unique_prompts(plain) if plain else ([], [])
        cu, ce = unique_prompts(ctx) if ctx else ([], [])
        self.n = len(pe) or len(ce)
        if self.fused or not (self.has_plain and self.has_ctx):
            self.b = self.a
            return self._split(self.a.prefill(pu + cu, pe + [len(pu) + e for e in ce]))
        return DeviceScores(self.a.prefill(pu, pe), self.b.prefill(cu, ce))

    def _split(self, logits: torch.Tensor) -> DeviceScores:
        if self.has_plain and self.has_ctx:
            return DeviceScores(logits[: self.n], logits[self.n:])
        return DeviceScores(logits, None) if self.has_plain else DeviceScores(None, logits)

    def step(self, token_ids: torch.Tensor) -> DeviceScores:
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            return self._split(self.a.step(torch.cat([token_ids, token_ids]) if both else token_ids))
        return DeviceScores(self.a.step(token_ids), self.b.step(token_ids))

    def keep(self, rows: torch.Tensor) -> None:
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            self.a.keep(torch.cat([rows, rows + self.n]) if both else rows)
        else:
            self.a.keep(rows)
            self.b.keep(rows)
        self.n = rows.numel()

    def release(self) -> None:
        self.a.release()
        self._b.release()
