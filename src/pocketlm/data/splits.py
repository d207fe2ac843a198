"""Deterministic per-user train / validation / test splits and the paper's two scenarios.

Splits are made at the document level with an RNG seeded by `(seed, user)`, so they are disjoint,
reproducible across processes, and a user's split does not move when other users are added.

Scenarios (CoMiGS §4): **id** — each user's validation and test come from its own data;
**ood** — validation and test are a uniform mixture over all users (equal tokens from each), the same
for every user, while training data stays the user's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..errors import DataError
from .corpora import UserCorpus
from .packing import tokenize_docs

SPLITS = ("train", "val", "test")
SCENARIOS = ("id", "ood")


@dataclass
class UserSplits:
    """Documents of one user, per split."""

    train: list[str]
    val: list[str]
    test: list[str]


@dataclass
class UserTokens:
    """Token streams of one user, per split (1-D int64 tensors, documents separated by EOS)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor

    def __getitem__(self, split: str) -> torch.Tensor:
        return getattr(self, split)


def split_user(user: str, docs: list[str], *, fractions=(0.8, 0.1, 0.1), seed: int = 0,
               max_chars: int | None = None) -> UserSplits:
    """Shuffle a user's documents with a `(seed, user)` RNG, optionally cap the text, and cut three ways."""
    if abs(sum(fractions) - 1.0) > 1e-6 or any(f <= 0 for f in fractions):
        raise DataError(f"split fractions must be positive and sum to 1, got {fractions}")
    order = list(range(len(docs)))
    random.Random(f"pocketlm-split:{seed}:{user}").shuffle(order)
    picked = [docs[i] for i in order]
    if max_chars is not None:
        kept, total = [], 0
        for d in picked:
            if total >= max_chars:
                break
            kept.append(d)
            total += len(d)
        picked = kept
    n = len(picked)
    if n < 3:
        raise DataError(f"user {user!r} has {n} document(s); at least 3 are needed for train/val/test")
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise DataError(f"user {user!r} has too few documents ({n}) for the split {fractions}")
    return UserSplits(picked[:n_train], picked[n_train:n_train + n_val], picked[n_train + n_val:])


def split_corpus(corpus: UserCorpus, **kw) -> dict[str, UserSplits]:
    return {user: split_user(user, docs, **kw) for user, docs in corpus.items()}


def build_scenario(corpus: UserCorpus, tokenizer, *, scenario: str = "id", seed: int = 0,
                   fractions=(0.8, 0.1, 0.1), max_chars: int | None = None) -> dict[str, UserTokens]:
    """Tokenize every user's splits and arrange validation/test for the chosen scenario."""
    if scenario not in SCENARIOS:
        raise DataError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")
    splits = split_corpus(corpus, fractions=fractions, seed=seed, max_chars=max_chars)
    tokens = {
        u: UserTokens(*(tokenize_docs(tokenizer, getattr(s, k)) for k in SPLITS)) for u, s in splits.items()
    }
    if scenario == "ood":
        mixed = {k: uniform_mixture([t[k] for t in tokens.values()]) for k in ("val", "test")}
        tokens = {u: UserTokens(t.train, mixed["val"], mixed["test"]) for u, t in tokens.items()}
    return tokens


def uniform_mixture(streams: list[torch.Tensor]) -> torch.Tensor:
    """Equal numbers of tokens from each stream (the shortest sets the share), concatenated in order."""
    share = min(len(s) for s in streams)
    return torch.cat([s[:share] for s in streams])


def token_summary(data: dict[str, UserTokens]) -> dict[str, dict[str, int]]:
    """`{user: {split: tokens}}`, for the summary table."""
    return {u: {k: int(t[k].numel()) for k in SPLITS} for u, t in data.items()}
