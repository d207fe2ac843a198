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
from ..steer.cloud.wire import MAX_VERIFY
from ..steer.streams.llama_step import causal_bias, decode, static_unsupported, store_prefill
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
        self.pad_slots = MAX_VERIFY  # spare slots the padding of a mixed step/verify batch may write into
        shape = (slots, self.kv_heads, capacity + self.pad_slots, self.head_dim)
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
        return self.extend(slots, [[i] for i in ids])[:, 0]

    @torch.inference_mode()
    def extend(self, slots: list[int], ids: list[list[int]]) -> torch.Tensor:
        """Append the ids of `ids[i]` to slot `slots[i]`, rows of different lengths in one forward (a step is one
        id, a verify a chosen id and a draft); the logits after each `[n, T, V]` (T = the longest; a shorter
        row's extra positions are padding: scored, not kept, and overwritten by the row's next ids)."""
        t = max(len(r) for r in ids)
        pos = [self.length[s] for s in slots]
        if max(p + len(r) for p, r in zip(pos, ids, strict=True)) > self.capacity:
            raise PocketLMError(f"a row reached the pool's {self.capacity}-token capacity")
        rows = torch.tensor(slots, dtype=torch.long, device=self.device)
        tok = torch.tensor([r + [r[-1]] * (t - len(r)) for r in ids], dtype=torch.long, device=self.device)
        at = torch.tensor(pos, dtype=torch.long, device=self.device).view(-1, 1) + torch.arange(t, device=self.device)
        at = at.clamp_max(self.capacity + self.pad_slots - 1)  # padding of a full row writes the spare slots
        out = self._decode(rows, tok, at, int(at.max()) + 1)
        for s, r in zip(slots, ids, strict=True):
            self.length[s] += len(r)
        return out

    def rewind(self, slots: list[int], drop: list[int]) -> None:
        """Forget the last `drop[i]` ids of slot `slots[i]` (a rejected draft): the next ids overwrite them."""
        for s, d in zip(slots, drop, strict=True):
            if d > self.length[s]:
                raise PocketLMError(f"rewind of {d} ids on a row holding {self.length[s]}")
            self.length[s] -= d

    def _decode(self, rows: torch.Tensor, tok: torch.Tensor, at: torch.Tensor, span: int) -> torch.Tensor:
        n, t = tok.shape
        bias = causal_bias(torch.ones(n, span, dtype=torch.bool, device=self.device), at[:, 0], t)

        def write(i, k, v):  # each row at its own positions
            self.k[i][rows.view(n, 1), :, at] = k.transpose(1, 2)
            self.v[i][rows.view(n, 1), :, at] = v.transpose(1, 2)
            return self.k[i][:, :, :span][rows], self.v[i][:, :, :span][rows]

        return decode(self.model, tok, at, bias, write, self.kv_heads)
