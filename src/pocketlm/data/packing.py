"""Tokenize documents into one stream and pack it into fixed-length blocks (or sample training windows)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DataError

IGNORE_INDEX = -100


def tokenize_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate the documents' token ids, each followed by EOS, as one 1-D int64 stream."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    if not docs:
        return torch.empty(0, dtype=torch.long)
    ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    out = []
    for seq in ids:
        out.extend(seq)
        out.append(eos)
    return torch.tensor(out, dtype=torch.long)


@dataclass
class Blocks:
    """Packed blocks: `input_ids` [N, L]; `labels` equal them except -100 on padding (ignored by the loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack_blocks(stream: torch.Tensor, block_len: int, *, pad_id: int = 0, drop_last: bool = False) -> Blocks:
    """Cut a stream into consecutive non-overlapping blocks; the tail block is padded unless dropped.

    Every token of the stream appears exactly once, so evaluation over these blocks covers the whole
    split deterministically (unlike the official code's random windows).
    """
    if block_len < 2:
        raise DataError(f"block length must be >= 2, got {block_len}")
    n = stream.numel()
    full = n // block_len
    rem = n - full * block_len
    ids = stream[: full * block_len].view(full, block_len)
    mask = torch.ones_like(ids)
    if rem >= 2 and not drop_last:  # a 1-token tail has nothing to predict
        tail = torch.full((1, block_len), pad_id, dtype=torch.long)
        tail[0, :rem] = stream[full * block_len:]
        tmask = torch.zeros_like(tail)
        tmask[0, :rem] = 1
        ids, mask = torch.cat([ids, tail]), torch.cat([mask, tmask])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return Blocks(ids, labels, mask)


def sample_windows(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """Random contiguous windows [B, L] (nanoGPT / official CoMiGS batching), reproducible via `generator`."""
    if stream.numel() <= seq_len:
        raise DataError(f"a split of {stream.numel()} tokens is too short for windows of {seq_len}")
    starts = torch.randint(0, stream.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s: s + seq_len] for s in starts.tolist()])
