"""Vocabulary alignment between two models: same-tokenizer checks and padded LM-head slicing."""

from __future__ import annotations

from ..errors import ModelLoadError


def check_same_tokenizer(tok_a, tok_b, *, names: tuple[str, str] = ("cloud", "device")) -> None:
    """Raise a clear error unless both tokenizers map every token string to the same id."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va == vb:
        return
    only_a = len(set(va) - set(vb))
    only_b = len(set(vb) - set(va))
    moved = sum(1 for t, i in va.items() if t in vb and vb[t] != i)
    raise ModelLoadError(
        f"the {names[0]} and {names[1]} tokenizers differ ({len(va)} vs {len(vb)} tokens; "
        f"{only_a} only in {names[0]}, {only_b} only in {names[1]}, {moved} with different ids). "
        "Use models with one tokenizer, or the vocabulary-intersection mapping for cross-family pairs."
    )


def head_rows(model) -> int:
    """Rows of the LM head (its vocabulary size), for a float or an int8-quantized head (whose `weight` is a
    method): `out_features` where the head has it."""
    head = model.get_output_embeddings()
    rows = getattr(head, "out_features", None)
    return int(rows) if isinstance(rows, int) else head.weight.shape[0]


def common_vocab_size(model_a, model_b, tokenizer=None) -> int:
    """Rows both LM heads share; padded heads (Qwen 7B 152,064 vs 0.5B 151,936) are sliced to this."""
    n = min(head_rows(model_a), head_rows(model_b))
    if tokenizer is not None:
        n = min(n, len(tokenizer))
    return n
