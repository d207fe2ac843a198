"""The speculative verify over `/v1/completions`: T drafted ids per live row up, T score rows back, one round trip.

The OpenAI API has no "append these ids and score each position" call, so a verify is built from completions:

* `parallel` (default): one ordinary step request per drafted position (the prompt + the draft up to that
  position), all sent at once. Each is exactly the request sequential decoding would send at that position,
  so the steered tokens are the sequential ones wherever a server's scores depend only on the request. The T
  requests share one round trip of latency; the server computes them concurrently (vLLM batches them and
  reuses the shared prefix) or one after another (llama-cpp-python's server holds one lock).
* `echo`: per row, one request for prompt + draft with `echo=true` (the server scores every prompt position in
  one forward) beside one step request for the whole sequence (the last position, whose echo entry not every
  server returns). Servers disagree on where an echoed position's log-probs sit: the OpenAI convention (vLLM)
  puts the distribution that *predicts* token i at token i; llama-cpp-python 0.3 pairs rows with tokens after
  dropping the first prompt token as if it were BOS, so it follows that convention for prompts that start with
  its BOS token (SmolLM2's chat prompts) and puts the distribution *after* token i there otherwise (measured on
  both). So every verify looks the whole-sequence entry up under both conventions (its best ids in the step's
  order, values within `ECHO_TOL`) and reads the draft's positions under the one that matches. A row where
  nothing matches, or both do (a repetitive draft), or whose text prompt re-tokenizes to other ids, takes
  `parallel` for that verify (`stats["echo_fallbacks"]`).

llama.cpp's scores move by ~0.1 nat with how its KV cache was built (a batched echo vs a step, or a step after
another prefix's request), for sequential decoding too; `stats["echo_drift"]` records the largest difference an
echo showed. Near-ties can then flip on it in either mode; on the test server (scores depend only on the ids)
both modes give exactly the sequential tokens.

`at(position)` answers certification asks (`exact`, `more`, `full`) for any verified position; `rewind` drops
the rejected suffix (the server keeps no state: the row's id sequence just gets shorter).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from .openai_http import OpenAICloudError
from .openai_pieces import RowTop, parse_echoed

log = logging.getLogger(__name__)

VERIFY_MODES = ("parallel", "echo")
VERIFY_CONCURRENCY = 32  # requests of one verify in flight at once (more queue behind them)
ECHO_TOL = 0.5  # nats: how far an echoed entry may sit from the step's answer and still be that distribution
ORDER_CHECK = 3  # ... and its best ids must be the step's, in the same order



def _after_first_draft(end: int, t: int, after: bool) -> int:
    """Index of the echoed entry holding the distribution after draft[0], for a draft of t - 1 tokens whose last
    sits at `end`: entry i is the distribution after token i (`after`) or the one that predicts token i."""
    return end - t + 1 if after else end - t + 2

class Verifying:
    """`extend` / `rewind` and per-position state for `OpenAICloud` (which provides `_top`, `_complete`,
    `_topk`, `_seqs`, `_tops`, `pieces`, `k`, `stats`)."""

    round_trips = True  # a network separates the engine from this cloud: speculation saves round trips
    verify_mode = "parallel"

    def _init_verify(self, mode: str) -> None:
        if mode not in VERIFY_MODES:
            raise OpenAICloudError(f"unknown verify mode {mode!r}; choose from {', '.join(VERIFY_MODES)}")
        self.verify_mode = mode
        self._verified: list[list[tuple[list[int], RowTop]]] = []  # per live row: (prefix, top) per position
        self._before: list[list[int]] = []  # per live row: its id sequence before the verify
        self._vpool: ThreadPoolExecutor | None = None
        self._echo_after = None  # True: the echoed entry at token i is the distribution after it (llama-cpp)
        self.stats.update(verify_calls=0, verify_requests=0, echo_requests=0, echo_fallbacks=0)
        self.stats["echo_drift"] = 0.0

    # -- per-position state --------------------------------------------------------------------------
    def _state(self, r: int, position: int | None) -> tuple[list[int], RowTop]:
        """(id sequence, top) of live row `r` at the last step or prefill (None; a verify leaves it the current
        one, as the step server does) or at `position` of the last verify."""
        if position is None:
            return (self._before[r] if self._verified else self._seqs[r]), self._tops[r]
        if not self._verified or not 0 <= position < len(self._verified[r]):
            raise OpenAICloudError(f"no verified position {position} for row {r}")
        return self._verified[r][position]

    def _put(self, r: int, position: int | None, row: RowTop) -> None:
        if position is None:
            self._tops[r] = row
            return
        seq, _ = self._verified[r][position]
        self._verified[r][position] = (seq, row)

    def _forget_verify(self) -> None:
        self._verified, self._before = [], []

    def _keep_verified(self, idx: list[int]) -> None:
        if self._verified:
            self._verified = [self._verified[i] for i in idx]
            self._before = [self._before[i] for i in idx]

    # -- the verify ----------------------------------------------------------------------------------
    def _map(self, fn, items: list):
        if self._vpool is None:
            self._vpool = ThreadPoolExecutor(VERIFY_CONCURRENCY, thread_name_prefix="pocketlm-verify")
        return list(self._vpool.map(fn, items))

    def extend(self, token_ids: torch.Tensor, candidates: list | None = None) -> list:
        """Append `token_ids` `[B, T]` to the live rows; per position j, the rows' scores after id j
        (`TopKLogits`). `candidates` (the step server's channel for certification asks) has no OpenAI
        equivalent and is ignored; asks go out afterwards through `at(j)`."""
        ids = [[int(t) for t in row] for row in token_ids.tolist()]
        if len(ids) != len(self._seqs):
            raise OpenAICloudError(f"{len(ids)} draft rows for {len(self._seqs)} live rows")
        t = len(ids[0]) if ids else 0
        prefixes = [[s + row[:j + 1] for j in range(t)] for s, row in zip(self._seqs, ids, strict=True)]
        self.stats["verify_calls"] += 1
        tops = self._echo_verify(prefixes) if self.verify_mode == "echo" else self._parallel(prefixes)
        self._before = [list(s) for s in self._seqs]
        self._verified = [list(zip(p, tp, strict=True)) for p, tp in zip(prefixes, tops, strict=True)]
        self._seqs = [list(p[-1]) for p in prefixes]
        return [self._topk([tops[r][j] for r in range(len(ids))]) for j in range(t)]

    def _parallel(self, prefixes: list[list[list[int]]]) -> list[list[RowTop]]:
        """One step request per distinct (row, position) sequence, all in flight at once."""
        distinct = list({tuple(s): None for row in prefixes for s in row})
        answers = dict(zip(distinct, self._map(lambda s: self._top(list(s)), distinct), strict=True))
        self.stats["verify_requests"] += len(distinct)
        return [[answers[tuple(s)] for s in row] for row in prefixes]

    def _echo_verify(self, prefixes: list[list[list[int]]]) -> list[list[RowTop]]:
        """Per distinct row: an echo request and a step request for its whole sequence, all at once; rows whose
        echo does not line up fall back to `_parallel` (a second round trip, counted)."""
        rows = list({tuple(p[-1]): len(p) for p in prefixes}.items())
        jobs = [(kind, seq, t) for seq, t in rows for kind in (("echo", "step") if t > 1 else ("step",))]
        done = self._map(lambda job: self._top(list(job[1])) if job[0] == "step" else self._complete(
            list(job[1]), echo=True), jobs)
        got = {(kind, seq): out for (kind, seq, _), out in zip(jobs, done, strict=True)}
        self.stats["verify_requests"] += len(jobs)
        self.stats["echo_requests"] += sum(kind == "echo" for kind, _, _ in jobs)
        out: dict[tuple, list[RowTop] | None] = {}
        for seq, t in rows:
            last = got[("step", seq)]
            out[seq] = [last] if t == 1 else self._read_echo(list(seq), t, *got[("echo", seq)], last)
        redo = [p for p in prefixes if out[tuple(p[-1])] is None]
        if redo:
            self.stats["echo_fallbacks"] += len(redo)
            again = self._parallel(redo)
            for p, tops in zip(redo, again, strict=True):
                out[tuple(p[-1])] = tops
        return [out[tuple(p[-1])] for p in prefixes]

    def _read_echo(self, seq: list[int], t: int, choice: dict, doc: dict, last: RowTop) -> list[RowTop] | None:
        """The T rows of one echoed verify (the last from the step request), or None where it does not line up."""
        lp = choice.get("logprobs") or {}
        tokens, tops = lp.get("tokens"), lp.get("top_logprobs")
        if not (isinstance(tokens, list) and isinstance(tops, list) and len(tokens) == len(tops)):
            raise OpenAICloudError(f"{self.url} answered an echo request without token log-probs")
        if self.prompt_mode == "text" and self.tokenizer(self._text(seq), add_special_tokens=False)["input_ids"] != seq:
            return None  # the server scores its own tokenization of the text, not these ids
        draft = seq[len(seq) - t:]
        # the draft's last token sits at the end of the echoed prompt, before the completion if it is listed
        ends = [e for e in (len(tokens) - 1, len(tokens) - 2) if e - t + 1 >= 0 and all(
            d in (self.pieces.ids(str(tokens[e - t + 1 + i])) or ()) for i, d in enumerate(draft))]
        readings = []  # (drift, end, after) of every reading whose whole-sequence entry is the step's answer
        for end in ends:
            for after in (True, False):
                at = end if after else end + 1  # where the distribution after the whole sequence is echoed
                first = _after_first_draft(end, t, after)
                if at >= len(tops) or any(not isinstance(tops[e], dict) or not tops[e] for e in range(first, at + 1)):
                    continue
                drift = self._drift(tops[at], str(tokens[at]), last)
                if drift <= ECHO_TOL:
                    readings.append((drift, end, after))
        if not readings or len({after for _, _, after in readings}) > 1:
            return None  # nothing lines up, or both conventions do (a repetitive draft): not safe to read
        drift, end, after = min(readings)
        self.stats["echo_drift"] = max(self.stats["echo_drift"], drift)
        if self._echo_after is not after:
            log.info("%s echoes at token i the distribution %s it", self.url, "after" if after else "that predicts")
        self._echo_after = after  # llama-cpp-python's depends on whether the prompt starts with its BOS token
        first = _after_first_draft(end, t, after)
        rows = [self._settled(seq[:len(seq) - t + j + 1],
                              parse_echoed(tops[first + j], self.k, str(tokens[first + j]), self.pieces))
                for j in range(t - 1)]
        return rows + [last]

    def _drift(self, echoed: dict, key: str, step: RowTop) -> float:
        """How far this echoed entry is from the step's distribution: the largest difference over the ids both
        name, or inf when their `ORDER_CHECK` best ids differ in identity or order (another position's)."""
        row = parse_echoed(echoed, self.k, key, self.pieces)
        if not row.known or not step.known:
            return math.inf
        n = min(ORDER_CHECK, len(row.known), len(step.known))
        if sorted(row.known, key=row.known.get, reverse=True)[:n] != sorted(step.known, key=step.known.get,
                                                                            reverse=True)[:n]:
            return math.inf
        return max((abs(row.known[i] - step.known[i]) for i in row.known.keys() & step.known.keys()),
                   default=math.inf)

    def rewind(self, drop: torch.Tensor) -> None:
        """Drop the newest `drop[r]` verified ids of each live row (the rejected suffix)."""
        for r, d in enumerate(drop.view(-1).tolist()):
            if not d:
                continue
            if not self._verified or d > len(self._verified[r]):
                raise OpenAICloudError(f"cannot rewind {d} ids of row {r}: the last verify appended "
                                       f"{len(self._verified[r]) if self._verified else 0}")
            keep = len(self._verified[r]) - d
            self._seqs[r] = list(self._verified[r][keep - 1][0] if keep else self._before[r])

    def _close_verify(self) -> None:
        if self._vpool is not None:
            self._vpool.shutdown(wait=True)
