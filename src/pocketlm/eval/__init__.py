"""Evaluation: perplexity (and, in later modules, ROUGE/METEOR and reports)."""

from .perplexity import block_nll, per_user_perplexity, perplexity

__all__ = ["block_nll", "per_user_perplexity", "perplexity"]
