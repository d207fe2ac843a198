"""Device-side guards against leaking the private context through the output.

Every chosen token goes up to the cloud, so a steered answer that copies the private context copies it *to the
cloud*: the demo's steered answer used to repeat its private context word for word. Two guards (guards.py)
stop that on the device, after any fusion rule:

- `MaxCopy(n)`: no candidate token may make a span of more than `n` consecutive words that occurs in the private
  context (and not in the public prompt, which the cloud has anyway) appear in the output.
- `Protect(words)`: a protected word (any casing, however the tokenizer splits it) is never completed in the
  output; a prefix may be written, the token that would complete the word is refused.
- `ProtectNames(extra)`: `Protect` per row for the context's proper names (`proper_names`): a name is short
  enough to slip under any `MaxCopy` and says the most about a person.

`private_by_default()` is what the commands run unless told `--no-guard`.

Both look at the decoded text of the tail of the output, so any tokenization of a word is caught.
"""

from __future__ import annotations

import re

from ...errors import PocketLMError
from .leakage import STOP_WORDS, ngrams, words

TAIL_TOKENS_PER_WORD = 4
DEFAULT_MAX_COPY = 8     # the project measured that this cap keeps the ROUGE gain of the steering methods


class _TextGuard:
    """Decodes a row's tail (+ candidate) once per check; the first word of a cut tail may be partial: dropped."""

    def __init__(self, tokenizer=None, tail_words: int = 8):
        self.tokenizer = tokenizer
        self.tail_tokens = TAIL_TOKENS_PER_WORD * tail_words + 8

    def _texts(self, generated: list[int], token: int, before: bool = True) -> tuple[str | None, str]:
        """(tail text, tail text + candidate); `before=False` skips decoding the first (MaxCopy needs only the
        second)."""
        n_tok = len(self.tokenizer)
        cut = len(generated) > self.tail_tokens
        tail = [t for t in generated[-self.tail_tokens:] if t < n_tok]
        after = self.tokenizer.decode(tail + ([token] if token < n_tok else []), skip_special_tokens=True)
        start = 0
        if cut:  # the cut may fall inside a word: start at the first word boundary (the texts share this prefix)
            m = re.search(r"\W", after)
            start = m.end() if m else len(after)
        prev = self.tokenizer.decode(tail, skip_special_tokens=True)[start:] if before else None
        return prev, after[start:]


def forbidden_spans(context: str, query: str, n: int) -> set[tuple[str, ...]]:
    """The (n+1)-word spans of the private context that MaxCopy(n) refuses (those of the public prompt are free)."""
    return ngrams(words(context), n + 1) - ngrams(words(query), n + 1)


class MaxCopy(_TextGuard):
    def __init__(self, n: int, tokenizer=None, spans: list[set] | None = None):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PocketLMError(f"--max-copy must be an integer >= 1 (words), got {n!r}")
        super().__init__(tokenizer, tail_words=n + 3)
        self.n = n
        self.name = f"max_copy_{n}"
        self.spans = spans or []

    def start(self, requests, tokenizer) -> MaxCopy:
        return MaxCopy(self.n, tokenizer, [forbidden_spans(r.context, r.query, self.n) for r in requests])

    def allows(self, row: int, generated: list[int], token: int) -> bool:
        forbidden = self.spans[row]
        if not forbidden:
            return True
        _, after = self._texts(generated, token, before=False)
        ws = words(after)[-(self.n + 3):]
        return not any(tuple(ws[i:i + self.n + 1]) in forbidden for i in range(len(ws) - self.n))


class Protect(_TextGuard):
    def __init__(self, protected, tokenizer=None):
        ws = sorted({w.strip().lower() for w in protected if w and w.strip()})
        if not ws:
            raise PocketLMError("--protect needs at least one word")
        longest = max(len(w) for w in ws)
        super().__init__(tokenizer, tail_words=max(4, longest // 2))
        self.words = ws
        self.name = "protect"
        self._pattern = re.compile("|".join(rf"(?<!\w){re.escape(w)}" for w in ws), re.IGNORECASE | re.UNICODE)

    def start(self, requests, tokenizer) -> Protect:
        return Protect(self.words, tokenizer)

    def allows(self, row: int, generated: list[int], token: int) -> bool:
        before, after = self._texts(generated, token)
        return len(self._pattern.findall(after)) <= len(self._pattern.findall(before))


class ProtectNames:
    """`Protect`, per row, for the proper names of that row's private context (and `extra` words) that its
    public prompt does not contain (the cloud has those anyway)."""

    name = "protect_names"

    def __init__(self, extra=(), rows: list | None = None):
        self.extra = tuple(extra)
        self.rows = rows or []

    def start(self, requests, tokenizer) -> ProtectNames:
        rows = []
        for r in requests:
            names = proper_names(r.context, r.query, self.extra)
            rows.append(Protect(names, tokenizer) if names else None)
        return ProtectNames(self.extra, rows)

    def allows(self, row: int, generated: list[int], token: int) -> bool:
        guard = self.rows[row]
        return guard is None or guard.allows(row, generated, token)


IM = ("I'", "I’")     # I'm, I've: the pronoun
_CAPITALISED = re.compile(r"(?<![\w'’])[^\W\d_][\w'’-]*", re.UNICODE)
# what starts a sentence or a clause (a capital there says nothing): . ! ? : ; an opening bracket, quote or bullet
_CLAUSE_START = re.compile(r"(?:[.!?…:;(\[{•|*#>–—-]|^)['\"“‘(\s]*$")


def proper_names(context: str, query: str = "", extra=()) -> list[str]:
    """The words of a private context that name someone or something: capitalised in mid-sentence (not after a
    sentence's or clause's start, a line's start, a colon or a bullet), at least 3 letters, not a stop word and
    never written in lower case in the context; plus the `extra` words (a front matter's `protect:` line); minus
    those the public prompt contains (the cloud has them). Sorted, as written."""
    public = set(words(query))
    lower = set(re.findall(r"\b[^\W\d_A-Z][\w'’-]*", context))    # words the context writes in lower case
    found: dict[str, str] = {}
    for line in context.splitlines():
        for m in _CAPITALISED.finditer(line):
            w = m.group().rstrip("'’-")
            if (not w[0].isupper() or len(w) < 3 or w.lower() in STOP_WORDS or w.lower() in lower or w[:2] in IM
                    or _CLAUSE_START.search(line[:m.start()])):
                continue
            found.setdefault(w.lower(), w)
    for w in extra:
        if w and w.strip():
            found.setdefault(w.strip().lower(), w.strip())
    return sorted(w for k, w in found.items() if not set(words(k)) <= public)


def private_by_default(max_copy: int | None = None, protect=()) -> list:
    """The guards every steering command runs unless told `--no-guard`: `MaxCopy(max_copy or 8)` and the
    context's proper names (plus the front matter's `protect` words) protected."""
    return [MaxCopy(max_copy or DEFAULT_MAX_COPY), ProtectNames(protect)]


def parse_front_matter(text: str) -> tuple[str, list[str]]:
    """(context, protected words) from a context file that may start with front matter:

        ---
        protect: verbose, Giulia
        ---
        the private context ...
    """
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return text, []
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise PocketLMError("context file: front matter opened with '---' is never closed") from None
    protect: list[str] = []
    for line in lines[1:end]:
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or key.strip() != "protect":
            raise PocketLMError(f"context file: unknown front-matter line {line.strip()!r} (only 'protect: w1, w2')")
        protect += [w.strip().strip("'\"") for w in value.strip().strip("[]").split(",") if w.strip()]
    return "\n".join(lines[end + 1:]), protect


def max_copy_untouched(text: str, context: str, query: str, n: int) -> bool:
    """Would `MaxCopy(n)` have let a generation of `text` through without refusing one token?

    Used to reuse unguarded greedy generations as guarded ones (eval-steer-overlay): under greedy decoding a
    guard that refuses nothing changes nothing. The guard judges the text after each candidate token, and a
    token may end inside a word, so every character prefix of `text` is checked (its last word possibly cut):
    a sufficient condition, since the guard only ever sees such prefixes (or a shorter tail of them).
    """
    forbidden = forbidden_spans(context, query, n)
    if not forbidden:
        return True
    firsts = {g[:-1] for g in forbidden}
    ws = words(text)
    for i in range(n, len(ws)):
        head = tuple(ws[i - n:i])
        if head in firsts and any(head + (ws[i][:k],) in forbidden for k in range(1, len(ws[i]) + 1)):
            return False
    return True


def names_untouched(text: str, context: str, query: str, extra=()) -> bool:
    """Would `ProtectNames` have let a generation of `text` through without refusing one token? Yes when `text`
    holds none of the row's protected names at a word start: the guard refuses a token only when the number of
    such matches in the text grows, and a match once written stays in every longer prefix (eval-steer-overlay)."""
    names = proper_names(context, query, extra)
    return not names or Protect(names)._pattern.search(text) is None
