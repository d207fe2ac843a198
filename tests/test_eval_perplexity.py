"""Perplexity equals a manual token-by-token computation and covers the whole test set."""

from __future__ import annotations

import math

import torch

from pocketlm.data import pack_blocks
from pocketlm.eval import block_nll, per_user_perplexity, perplexity
from pocketlm.models import build_tiny


def manual_ppl(model, stream, block_len):
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, stream.numel(), block_len):
            chunk = stream[start:start + block_len]
            if chunk.numel() < 2:
                continue
            logp = torch.log_softmax(model(chunk.unsqueeze(0)).logits[0].double(), -1)
            for t in range(chunk.numel() - 1):
                total -= logp[t, chunk[t + 1]].item()
                count += 1
    return math.exp(total / count), count


def test_perplexity_matches_manual():
    model, _ = build_tiny("tiny-llama", seed=5)
    stream = torch.randint(0, 260, (123,), generator=torch.Generator().manual_seed(0))
    expected, count = manual_ppl(model, stream, 16)
    got = perplexity(model, stream, block_len=16, batch_size=3)
    assert math.isclose(got, expected, rel_tol=1e-5)
    _, n = block_nll(model, pack_blocks(stream, 16), batch_size=4)
    assert n == count == 123 - 8  # one unpredicted first token per block (8 blocks)


def test_perplexity_batch_size_invariant():
    model, _ = build_tiny("tiny-gpt2", seed=1)
    stream = torch.randint(0, 260, (200,), generator=torch.Generator().manual_seed(1))
    a = perplexity(model, stream, block_len=32, batch_size=1)
    b = perplexity(model, stream, block_len=32, batch_size=7)
    assert math.isclose(a, b, rel_tol=1e-5)


def test_per_user_perplexity_keeps_training_mode():
    model, _ = build_tiny("tiny-qwen2")
    model.train()
    data = {"u": {"test": torch.arange(40) % 260}}
    out = per_user_perplexity(model, data, block_len=8)
    assert set(out) == {"u"} and out["u"] > 1
    assert model.training
