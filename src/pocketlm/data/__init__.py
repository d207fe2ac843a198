"""User corpora, deterministic splits, scenarios, tokenization and packing. Imports nothing from above."""

from .corpora import UserCorpus, load_corpus, read_agnews, read_folder, read_jsonl, read_shakespeare
from .packing import IGNORE_INDEX, Blocks, pack_blocks, sample_windows, tokenize_docs
from .splits import (
    SCENARIOS,
    SPLITS,
    UserSplits,
    UserTokens,
    build_scenario,
    split_corpus,
    split_user,
    token_summary,
    uniform_mixture,
)

__all__ = [
    "IGNORE_INDEX", "SCENARIOS", "SPLITS", "Blocks", "UserCorpus", "UserSplits", "UserTokens",
    "build_scenario", "load_corpus", "pack_blocks", "read_agnews", "read_folder", "read_jsonl",
    "read_shakespeare", "sample_windows", "split_corpus", "split_user", "token_summary",
    "tokenize_docs", "uniform_mixture",
]
