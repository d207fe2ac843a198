"""Perplexity over a user's *whole* deterministic test set: exp(total token NLL / predicted tokens)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.packing import IGNORE_INDEX, Blocks, pack_blocks
from ..progress import progress


@torch.no_grad()
def block_nll(model, blocks: Blocks, *, batch_size: int = 8, desc: str | None = None) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over all blocks (batched, no grad)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    try:
        for s in progress(starts, desc=desc, total=len(starts)):
            ids = blocks.input_ids[s:s + batch_size].to(device)
            mask = blocks.attention_mask[s:s + batch_size].to(device)
            labels = blocks.labels[s:s + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum")
            total += nll.item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, stream: torch.Tensor, *, block_len: int = 128, batch_size: int = 8,
               pad_id: int = 0, desc: str | None = None) -> float:
    """Perplexity of `model` on a token stream packed into consecutive blocks of `block_len`."""
    blocks = pack_blocks(stream, block_len, pad_id=pad_id)
    total, count = block_nll(model, blocks, batch_size=batch_size, desc=desc)
    if count == 0:
        raise ValueError("no tokens to evaluate")
    return math.exp(total / count)


def per_user_perplexity(model, data: dict, *, split: str = "test", block_len: int = 128,
                        batch_size: int = 8, pad_id: int = 0) -> dict[str, float]:
    """`{user: ppl}` over each user's whole `split` stream."""
    return {
        user: perplexity(model, toks[split], block_len=block_len, batch_size=batch_size, pad_id=pad_id,
                         desc=f"ppl {user}")
        for user, toks in data.items()
    }
