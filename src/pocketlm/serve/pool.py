"""A pool of KV-cache rows shared by every session of the step server, stepped as one batch.

Why a pool: continuous batching steps whichever rows have a pending token, each at its own length. With one
preallocated `[slots, kv_heads, capacity, head_dim]` buffer per layer, a session row owns a slot from `open`
to `close`; a batched step writes each row's new key/value at that row's own position and attends over the
row's filled prefix (a per-row validity mask), so rows of different lengths share one forward without left
padding or joining caches (HF's DynamicCache would need every session's cache concatenated and split again
on every step). Memory is allocated once: sessions coming and going reuse slots, so it stays flat.

The one-token forward is `steer.streams.llama_step.decode`, shared with the static stream (Llama / Qwen2 / Qwen3
layouts); prefill runs the model's normal forward once per distinct prompt and copies the keys/values in.
"""

from __future__ import annotations

import logging

import torch

from ..errors import PocketLMError
from ..steer.streams.llama_step import decode, static_unsupported, store_prefill
from ..steer.streams.prefill import prefill_one

log = logging.getLogger(__name__)


class KVPool:
    """`slots` rows of `capacity` tokens; `prefill(prompt, slots)` and `step(slots, ids)` return fp32 logits."""

    def __init__(self, model, slots: int, capacity: int):
        why = static_unsupported(model)
        if why:
            raise PocketLMError(f"the step server batches Llama / Qwen2 / Qwen3 layouts only, not {why}")
        self.model, self.inner = model, model.model
        self.device = next(model.parameters()).device
        cfg = model.config
        self.head_dim, self.kv_heads = self.inner.layers[0].self_attn.head_dim, cfg.num_key_value_heads
        self.slots, self.capacity = slots, capacity
        shape = (slots, self.kv_heads, capacity, self.head_dim)
        kw = dict(dtype=self.inner.embed_tokens.weight.dtype, device=self.device)
        self.k = [torch.zeros(shape, **kw) for _ in self.inner.layers]
        self.v = [torch.zeros(shape, **kw) for _ in self.inner.layers]
        self.length = [0] * slots          # tokens held per slot (host side: no device sync to plan a step)
        self._free = list(range(slots - 1, -1, -1))
        log.info("KV pool: %d slots x %d tokens, %.1f MiB", slots, capacity, self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PocketLMError(f"{n} rows asked, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def give_back(self, slots: list[int]) -> None:
        for s in slots:
            self.length[s] = 0
        self._free.extend(slots)

    @torch.inference_mode()
    def prefill(self, prompt: list[int], slots: list[int]) -> torch.Tensor:
        """Run `prompt` once and start every slot of `slots` from it; its next-token logits `[1, V]`."""
        if len(prompt) >= self.capacity:
            raise PocketLMError(f"prompt of {len(prompt)} tokens does not fit {self.capacity} slots")
        cache, logits = prefill_one(self.model, prompt, self.device)
        n = len(prompt)
        for s in slots:
            store_prefill(cache, self.k, self.v, s, 0)
        for s in slots:
            self.length[s] = n
        return logits

    @torch.inference_mode()
    def step(self, slots: list[int], ids: list[int]) -> torch.Tensor:
        """Append `ids[i]` to slot `slots[i]` (one forward for all) and return the next logits `[n, V]`."""
        pos = [self.length[s] for s in slots]
        if max(pos) >= self.capacity:
            raise PocketLMError(f"a row reached the pool's {self.capacity}-token capacity")
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        tok = torch.tensor(ids, dtype=torch.long, device=self.device).view(-1, 1)
        at = torch.tensor(pos, dtype=torch.long, device=self.device)
        out = self._decode(rows, tok, at, max(pos) + 1)
        for s in slots:
            self.length[s] += 1
        return out

    def _decode(self, rows: torch.Tensor, tok: torch.Tensor, at: torch.Tensor, span: int) -> torch.Tensor:
        n = rows.numel()
        filled = torch.arange(span, device=self.device).unsqueeze(0) <= at.unsqueeze(1)  # [n, span]
        bias = torch.zeros(n, 1, 1, span, dtype=torch.float32, device=self.device)
        bias = bias.masked_fill(~filled[:, None, None, :], float("-inf"))

        def write(i, k, v):  # each row at its own position
            self.k[i][rows, :, at] = k[:, :, 0]
            self.v[i][rows, :, at] = v[:, :, 0]
            return self.k[i][:, :, :span][rows], self.v[i][:, :, :span][rows]

        return decode(self.model, tok, at.view(n, 1), bias, write, self.kv_heads)[:, -1, :]
