"""The one interface through which the device reaches the cloud model.

A backend receives token ids only (the public query's prompt ids once, then one chosen id per row per
step) and returns next-token logits. The private context never appears in its arguments, so putting the
cloud behind a network later (a step server, an OpenAI-compatible API) changes nothing on the device.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .streams import make_stream, resolve_kv


@runtime_checkable
class CloudBackend(Protocol):
    """prefill/step return next-token logits `[B, vocab_rows]` for each live row."""

    vocab_rows: int
    eos_token_ids: set[int]

    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> torch.Tensor:
        """Start one session row per entry of `expand` (default: one per prompt) from the prompts' ids."""

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one chosen token id per live row; return the next logits."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these live rows (finished rows are dropped)."""

    def release(self) -> None:
        """End the session and free its state."""


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

    `kv`: 'dynamic' (HF DynamicCache), 'static' (fixed-shape steps, CUDA graphs on a GPU) or 'auto'. The
    attribute may be changed between generations (benchmarks compare both on one model); one stream per mode
    is kept, so a static stream's buffers and graphs survive from one generation to the next.
    """

    def __init__(self, model, tokenizer=None, kv: str = "auto"):
        self.model = model
        self.vocab_rows = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
        self.pad_id = pad if pad is not None else 0
        self.kv = kv
        self._streams: dict[str, object] = {}

    @property
    def stream(self):
        mode = resolve_kv(self.model, self.kv)
        if mode not in self._streams:
            self._streams[mode] = make_stream(self.model, self.pad_id, mode)
        return self._streams[mode]

    def reserve(self, new_tokens: int) -> None:
        """Optional hint before prefill: how many tokens will be decoded (sizes a static cache)."""
        self.stream.reserve(new_tokens)

    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> torch.Tensor:
        self._active = self.stream
        return self._active.prefill(prompts, expand)

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._active.step(token_ids)

    def keep(self, rows: torch.Tensor) -> None:
        self._active.keep(rows)

    def release(self) -> None:
        self._active.release()
