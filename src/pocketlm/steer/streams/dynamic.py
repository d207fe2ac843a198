"""The dynamic-cache stream: a KV-cached batch of rows on one HF causal LM (left padding, per-row positions).

Used for the cloud (inside the in-process backend) and for the device whenever the static stream cannot run.
Several prompts are prefilled once each and then *expanded* (the cache rows are copied) so that rows sharing a
prompt — e.g. one example decoded by several methods — pay for the prefill once. `keep()` drops finished rows.
Implements `protocol.Stream`; `kvmode.make_stream` picks it or the fixed-shape `StaticLMStream`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ...moe.row_adapters import adapter_rows
from .prefill import (
    adapter_flags,
    check_prompts,
    forward_step,
    forward_tokens,
    join_left_padded,
    prefill_each,
)


class LMStream:
    """Rows of one model decoded in lockstep: `prefill()` once, then one `step()` per generated token."""

    def __init__(self, model, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self.pos: torch.Tensor | None = None   # [B] position of the last real token
        self.adapters: torch.Tensor | None = None  # [B] row modes (moe.row_adapters; None: all PERSONAL)
        self.forwards = 0

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        with adapter_rows(self.model, self.adapters):
            logits, self.cache = forward_step(self.model, ids, self.mask, pos, self.cache)
        self.forwards += 1
        return logits

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None,
                adapters: list[int] | None = None) -> torch.Tensor:
        """Run the prompts; return last-position logits `[B, V]` (B = len(expand) if given). `adapters[i]`:
        decode prompt i's rows in that row mode (moe.row_adapters: PERSONAL, the default; BASE; SHARED).

        Each distinct prompt is prefilled on its own (no padding compute: a 60-token query beside a
        1,500-token private context would otherwise cost as much as a second context), then the caches
        are joined with left padding into one batch.
        """
        check_prompts(prompts)
        width = max(len(p) for p in prompts)
        flags = adapter_flags(adapters, len(prompts), self.device)
        caches, logits = prefill_each(self.model, prompts, flags, self.device)
        self.forwards += len(prompts)
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            mask[i, width - len(p):] = 1
        self.cache = caches[0] if len(caches) == 1 else join_left_padded(caches, width)
        self.mask, self.pos, self.adapters = mask, mask.sum(-1) - 1, flags
        out = torch.cat(logits)
        if expand is not None:
            self.keep(torch.tensor(expand, dtype=torch.long))
            out = out[torch.tensor(expand, dtype=torch.long, device=out.device)]
        return out

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the next-token logits `[B, V]`."""
        ids = token_ids.to(self.device).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        self.pos = self.pos + 1
        return self._forward(ids, self.pos.view(-1, 1))

    @torch.inference_mode()
    def extend(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        """Append `T` tokens per row (`[B, T]`, one forward); the next-token logits after each, `T` x `[B, V]`."""
        ids = token_ids.to(self.device)
        t = ids.shape[1]
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        positions = self.pos.view(-1, 1) + torch.arange(1, t + 1, device=self.device)
        self.pos = self.pos + t
        with adapter_rows(self.model, self.adapters):
            logits, self.cache = forward_tokens(self.model, ids, self.mask, positions, self.cache)
        self.forwards += 1
        return list(logits.unbind(1))

    def rewind(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` tokens of row i (`[B]`): they stay in the cache, masked out for good, and
        the row's next token takes the position after what it kept."""
        drop = drop.to(self.device)
        cols = torch.arange(self.mask.shape[1], device=self.device)
        self.mask = self.mask.masked_fill(cols.unsqueeze(0) >= self.mask.shape[1] - drop.unsqueeze(1), 0)
        self.pos = self.pos - drop

    def reserve(self, new_tokens: int) -> None:
        """Sizing hint before prefill; a dynamic cache grows as it goes, so nothing to do."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/duplicate) the given rows of the cache, mask and positions."""
        rows = rows.to(self.device)
        if self.rows == rows.numel() and torch.equal(rows, torch.arange(self.rows, device=self.device)):
            return
        self.cache.reorder_cache(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]
        if self.adapters is not None:
            self.adapters = self.adapters[rows]

    def release(self) -> None:
        self.cache = self.mask = self.pos = self.adapters = None
