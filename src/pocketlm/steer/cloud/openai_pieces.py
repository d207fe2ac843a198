"""Reading an OpenAI-style `top_logprobs` dict soundly: token strings back to device ids, and a bound.

An OpenAI-compatible server names its top tokens by *string* (`{" the": -0.4, ...}`), not by id. The device
maps each string back to an id with a table built once from the (shared) tokenizer. Two things can go wrong,
and both must keep the bound sound (no id outside the returned ones may score above it):

* a string that several ids render to (special tokens and partial UTF-8 bytes render as "" in llama.cpp, or
  as "\\ufffd" in HF) or that the table does not know is *ambiguous*: its value belongs to some id, but not
  to one we can name. It is never assigned; the bound rises to its value.
* two returned ids with one string collapse into one dict key, so fewer keys than asked come back and a
  hidden value may exceed every shown one. Then the only sound bound is the probability mass left over:
  `log(1 - sum(exp(shown)))` (scores are log-probabilities).

vLLM's `return_tokens_as_token_ids` names tokens `"token_id:N"`: exact, nothing ambiguous.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

TOKEN_ID = re.compile(r"token_id:(\d+)")
REPLACEMENT = "\ufffd"


class PieceMap:
    """Token string -> the device ids that render to it, built once from the tokenizer.

    Each id is entered under its HF rendering (`decode([id])`), under that rendering with U+FFFD removed
    (servers that decode with errors="ignore", as llama-cpp-python does), and special tokens also under ""
    (llama.cpp renders them empty)."""

    def __init__(self, tokenizer, size: int):
        self.size = size
        pieces = tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special |= {i for i, t in added.items() if getattr(t, "special", False)}
        self.piece = pieces
        self._ids: dict[str, set[int]] = {}
        for i, s in enumerate(pieces):
            self._add(s, i)
            if REPLACEMENT in s:
                self._add(s.replace(REPLACEMENT, ""), i)
            if i in special:
                self._add("", i)

    def _add(self, s: str, i: int) -> None:
        self._ids.setdefault(s, set()).add(i)

    def ids(self, key: str) -> set[int] | None:
        """The ids a returned key may stand for (None: a string the tokenizer cannot render, so any id)."""
        m = TOKEN_ID.fullmatch(key)
        if m:
            return {int(m.group(1))}
        return self._ids.get(key)

    def unique(self, i: int) -> bool:
        """True when id `i`'s rendering names it alone (a returned key with that string is surely `i`)."""
        return len(self._ids.get(self.piece[i], ())) == 1


@dataclass
class RowTop:
    """One row's step: exactly known `{id: logprob}`, the `bound` no other id exceeds, and what it is made of:
    `floor` (the smallest shown value: every id outside the top-K is below it), `rest` (the probability mass
    no shown value accounts for; it bounds hidden ids only when keys `collided`), and the `ambiguous` keys
    (value, the ids it may stand for or None)."""

    known: dict[int, float]
    floor: float
    rest: float
    ambiguous: list[tuple[float, set[int] | None]] = field(default_factory=list)
    collided: bool = False
    bound: float = field(init=False)

    def __post_init__(self):
        self.rebound()

    def rebound(self) -> None:
        """Recompute `bound` (after ambiguous keys were resolved or hidden mass was accounted for)."""
        hidden = math.log(self.rest) if self.collided and self.rest > 0 else -math.inf
        self.bound = max([self.floor, hidden] + [v for v, _ in self.ambiguous])


def parse_top(top: dict[str, float], asked: int, pieces: PieceMap) -> RowTop:
    """A `top_logprobs` dict for one position, asked with `logprobs=asked`, as a sound `RowTop`."""
    if not top:
        raise ValueError("empty top_logprobs")
    values = [float(v) for v in top.values()]
    if any(math.isnan(v) or v > 1e-4 for v in values):
        raise ValueError(f"top_logprobs holds values that are not log-probabilities: {max(values)}")
    known: dict[int, float] = {}
    ambiguous: list[tuple[float, set[int] | None]] = []
    for key, v in top.items():
        ids = pieces.ids(key)
        if ids is not None and len(ids) == 1:
            known[next(iter(ids))] = float(v)
        else:
            ambiguous.append((float(v), ids))
    # fewer keys than asked: two ids shared a key and the dict kept one; the other may be any value the
    # leftover mass allows
    collided = len(top) < min(asked, pieces.size)
    return RowTop(known, min(values), 1.0 - sum(math.exp(v) for v in values), ambiguous, collided)


def parse_echoed(top: dict[str, float], asked: int, extra: str, pieces: PieceMap) -> RowTop:
    """An *echoed* position's `top_logprobs`: the top `asked` plus the entry of the token that stands at that
    position (`extra`, its key), which servers add even when it ranks lower. An entry beyond the top-`asked`
    must not lower the bound: when the dict holds one key more than asked, the bound comes from the others and
    the extra value is simply known; when the extra key is the strict minimum of exactly `asked` keys, it may be
    that extra with two top ids collapsed into one key, so the bound falls back to the leftover mass."""
    if extra not in top or len(top) < 2:
        return parse_top(top, asked, pieces)
    others = {k: v for k, v in top.items() if k != extra}
    value = float(top[extra])
    if len(top) > min(asked, pieces.size):  # the extra entry came on top of a full top-`asked`
        row = parse_top(others, asked, pieces)
    else:
        row = parse_top(top, asked, pieces)
        if value < min(float(v) for v in others.values()):  # extra or the asked-th best: cannot tell
            row.collided = True
            row.rebound()
        return row
    ids = pieces.ids(extra)
    if ids is not None and len(ids) == 1:
        row.known[next(iter(ids))] = value
    return row
