"""The in-process cloud: an HF model behind the `CloudBackend` stream protocol (token ids in, logits out).

A backend receives token ids only (the public query's prompt ids once, then one chosen id per row per step)
and returns next-token logits. The private context never appears in its arguments, so a cloud behind a
network is one more implementation of the same protocol (`protocol.py`) and changes nothing on the device.
"""

from __future__ import annotations

import torch

from ...errors import PocketLMError
from ...models.vocab import head_rows
from ..streams.kvmode import cache_modes, make_stream, resolve_kv
from ..streams.protocol import CloudBackend

__all__ = ["CloudBackend", "HFCloudBackend", "eos_ids"]


def eos_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation config (Qwen instruct: im_end + endoftext)."""
    ids: set[int] = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    return ids


class HFCloudBackend:
    """The cloud as an in-process HF model with a KV-cached stream.

    `kv`: 'dynamic' (HF DynamicCache), 'static' (fixed-shape steps, CUDA graphs on a GPU), 'compiled' or 'auto'.
    The mode may be changed between generations (`set_cache_mode`; benchmarks compare modes on one model); one
    stream per mode is kept, so a static stream's buffers and graphs survive from one generation to the next.
    """

    round_trips = False  # no network between the engine and this cloud (speculation has nothing to save)

    def __init__(self, model, tokenizer=None, kv: str = "auto"):
        self.model = model
        self.vocab_rows = head_rows(model)
        self.eos_token_ids = eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0
        self._streams: dict[str, object] = {}
        self._active = None
        self.set_cache_mode(kv)

    def cache_modes(self) -> tuple[str, ...]:
        return cache_modes(self.model)

    def set_cache_mode(self, mode: str) -> None:
        resolved = resolve_kv(self.model, mode)
        if resolved not in self.cache_modes():
            raise PocketLMError(f"the cloud model cannot decode with kv={mode!r} "
                                f"(it supports {', '.join(self.cache_modes())})")
        self.mode = resolved

    @property
    def stream(self):
        if self.mode not in self._streams:
            self._streams[self.mode] = make_stream(self.model, self.pad_id, self.mode)
        return self._streams[self.mode]

    def reserve(self, new_tokens: int) -> None:
        self.stream.reserve(new_tokens)

    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> torch.Tensor:
        self._active = self.stream
        return self._active.prefill(prompts, expand)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._active.step(token_ids)

    def extend(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        return self._active.extend(token_ids)

    def rewind(self, drop: torch.Tensor) -> None:
        self._active.rewind(drop)

    def keep(self, rows: torch.Tensor) -> None:
        self._active.keep(rows)

    def release(self) -> None:
        if self._active is not None:
            self._active.release()
