"""The device's two streams — without and with the private context — as one `Stream`.

Rows are requests: each has a plain prompt (the public query, as the cloud sees it) and/or a context prompt
(context + query), and one chosen token per step advances both. By default the two run as ONE batched forward
(rows [plain..., ctx...], left padded), which costs about one device pass per token instead of two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...moe.row_adapters import PERSONAL
from .kvmode import make_stream
from .prefill import unique_prompts


@dataclass(frozen=True)
class DevicePrompt:
    """One request's device prompts: the reference stream (`plain`) and the informed stream (`ctx`).

    With a personal device model the reference may run the *base* model (`plain_mode=BASE`): the steering
    signal is then what the user's adapters learned (`log p_personal - log p_base`); or its *shared* parts only
    (`SHARED`: what the private experts add), switched per row inside one batched forward (moe.row_adapters).
    The informed stream always runs the model as it is."""

    plain: list[int] | None
    ctx: list[int] | None
    plain_mode: int = PERSONAL


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
        plain = [p.plain for p in prompts] if prompts and prompts[0].plain is not None else None
        ctx = [p.ctx for p in prompts] if prompts and prompts[0].ctx is not None else None
        if (plain is not None and any(p is None for p in plain)) or (ctx is not None and any(c is None for c in ctx)):
            raise ValueError("every device row needs the same kind of prompts")
        self.has_plain, self.has_ctx = plain is not None, ctx is not None
        self.b = self._b
        switch = plain is not None and any(p.plain_mode != PERSONAL for p in prompts)  # base/shared on some rows
        # a reference prompt on the base model and the same ids on the personal model are different rows
        keyed, pe = unique_prompts([[int(p.plain_mode), *p.plain] for p in prompts] if plain else [])
        pu, pflags = [k[1:] for k in keyed], [k[0] for k in keyed]
        cu, ce = unique_prompts(ctx) if ctx else ([], [])
        cflags = [PERSONAL] * len(cu)
        self.n = len(pe) or len(ce)
        if self.fused or not (self.has_plain and self.has_ctx):
            self.b = self.a
            flags = pflags + cflags if switch else None
            return self._split(self.a.prefill(pu + cu, pe + [len(pu) + e for e in ce], adapters=flags))
        return DeviceScores(self.a.prefill(pu, pe, adapters=pflags if switch else None), self.b.prefill(cu, ce))

    def _split(self, logits: torch.Tensor) -> DeviceScores:
        if self.has_plain and self.has_ctx:
            return DeviceScores(logits[: self.n], logits[self.n:])
        return DeviceScores(logits, None) if self.has_plain else DeviceScores(None, logits)

    def step(self, token_ids: torch.Tensor) -> DeviceScores:
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            return self._split(self.a.step(torch.cat([token_ids, token_ids]) if both else token_ids))
        return DeviceScores(self.a.step(token_ids), self.b.step(token_ids))

    def extend(self, token_ids: torch.Tensor) -> list[DeviceScores]:
        """`T` tokens per row (`[B, T]`) into both streams at once; one `DeviceScores` per appended position."""
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            return [self._split(x) for x in self.a.extend(torch.cat([token_ids, token_ids]) if both else token_ids)]
        return [DeviceScores(p, c) for p, c in zip(self.a.extend(token_ids), self.b.extend(token_ids), strict=True)]

    def rewind(self, drop: torch.Tensor) -> None:
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            self.a.rewind(torch.cat([drop, drop]) if both else drop)
        else:
            self.a.rewind(drop)
            self.b.rewind(drop)

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
