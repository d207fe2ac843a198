"""Guards: constraints that compose after any fusion rule and veto tokens before they are chosen.

A guard never edits a distribution; it says whether a candidate token is allowed after what a row has already
generated. The decoder chooses a token from the fused scores; while a guard refuses it, that token is masked
and the choice is made again (greedy: the next best; sampling: a new draw), so a guard costs nothing on the
rows and steps where it agrees with the rule. Guards work on device token ids and the device tokenizer's text,
so they are independent of the fusion vocabulary.

`start()` gives each generation its own guard state built from that generation's requests (for the leak guard:
the private context, which never leaves the device).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ...errors import PocketLMError


@runtime_checkable
class Guard(Protocol):
    name: str

    def start(self, requests: list, tokenizer) -> Guard:
        """The guard for one generation of these requests (a `SteerRequest` per row)."""

    def allows(self, row: int, generated: list[int], token: int) -> bool:
        """May request `row`, having generated `generated` (device ids), emit `token` next?"""


class NoRepeatNGram:
    """No n-gram of tokens may occur twice in one output (HF's `no_repeat_ngram_size`): a repetition limit that
    stops degenerate loops, whatever the rule."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise PocketLMError(f"no-repeat n-gram size must be an integer >= 1, got {n!r}")
        self.n = n
        self.name = f"no_repeat_{n}gram"

    def start(self, requests, tokenizer) -> NoRepeatNGram:
        return self

    def allows(self, row: int, generated: list[int], token: int) -> bool:
        n = self.n
        if len(generated) < n - 1:
            return True
        head = tuple(generated[len(generated) - n + 1:]) if n > 1 else ()
        for i in range(len(generated) - n + 1):
            if tuple(generated[i:i + n - 1]) == head and generated[i + n - 1] == token:
                return False
        return True


def build_guards(max_copy: int | None = None, protect: list[str] | tuple = (),
                 no_repeat_ngram: int | None = None) -> list:
    """The guards the command-line options ask for (`--max-copy N`, `--protect W1,W2`, `--no-repeat-ngram N`)."""
    from .leak_guard import MaxCopy, Protect

    out: list = []
    if max_copy is not None:
        out.append(MaxCopy(max_copy))
    if protect:
        out.append(Protect(protect))
    if no_repeat_ngram is not None:
        out.append(NoRepeatNGram(no_repeat_ngram))
    return out
