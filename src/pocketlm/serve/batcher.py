"""Sessions and continuous batching: one model thread owns the KV pool and runs every pending step at once.

Connection handlers (asyncio) never touch the model: they put a `Work` item on a queue and await its future.
The model thread takes everything queued, applies opens / keeps / closes in arrival order, then runs ONE
forward for all pending steps of all sessions. While that forward runs, new steps queue up and form the next
batch, so the batch size follows the load without a fixed wait window (continuous batching).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..errors import PocketLMError
from ..models.vocab import head_rows
from ..steer.cloud.wire import encode_scores, encode_topk
from ..steer.downlink.topk import TopKLogits, truncate
from ..steer.streams.prefill import unique_prompts
from .pool import KVPool

log = logging.getLogger(__name__)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 10**9)  # rows per batched step, for the /metrics histogram


class ServeError(PocketLMError):
    """A refused request: `status` is the HTTP-like code sent to the client (4000 + status closes the socket)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Session:
    id: int
    slots: list[int] = field(default_factory=list)
    fmt: str = "f32"
    budget: int = 0  # new tokens a row may hold (max_new_tokens of the open)
    used: list[int] = field(default_factory=list)  # new tokens each live row holds (a rewind gives some back)
    topk: int | None = None     # the top-k downlink: k, the columns it ranks, and this step's full rows
    columns: int = 0
    last: torch.Tensor | None = None  # [live rows, columns] fp32 on the CPU, for `exact` / `full`
    verified: torch.Tensor | None = None  # [live rows, T, columns]: the last verify's rows, for `position=`

    def encode(self, logits: torch.Tensor) -> bytes:
        """This session's frame of next-token logits `[rows, V]` (a top-k session keeps the rows for `exact`)."""
        if self.topk is None:
            return encode_scores(logits, self.fmt)
        self.last = logits[:, : self.columns].float().cpu()
        return encode_topk(truncate(self.last, self.topk))

    def encode_verify(self, logits: torch.Tensor, ids: list[list[int]],
                      candidates: list[list[list[int]]] | None = None) -> bytes:
        """A verify's frame: `[rows, T, V]` flattened row-major (row i's position j at i*T + j). In the top-k
        format each position also carries the exact score of the draft token sent after it (`ids[i][j + 1]`):
        the token the device will most likely choose there, so its certification needs no extra ask; and of
        the position's `candidates` (the ids the device expects its certification to ask about)."""
        n, t = logits.shape[:2]
        if self.topk is None:
            return encode_scores(logits.reshape(n * t, -1), self.fmt)
        self.verified = logits[:, :, : self.columns].float().cpu()
        flat = self.verified.reshape(n * t, -1)
        top = truncate(flat, min(self.topk + 1, self.columns - 1))  # k + 1 distinct ids, bound the (k + 2)-th
        nxt = torch.tensor([r[j + 1] if j + 1 < t else -1 for r in ids for j in range(t)])
        present = (top.ids == nxt.unsqueeze(1)).any(1)
        swap = ((nxt >= 0) & (nxt < self.columns) & ~present).nonzero().flatten()
        if swap.numel():  # the (k + 1)-th gives way to the draft token; the bound goes back to the (k + 1)-th
            top.bound[swap] = top.scores[swap, -1]
            top.ids[swap, -1] = nxt[swap]
            top.scores[swap, -1] = flat[swap, nxt[swap]]
        if candidates:
            top = self._with_candidates(top, flat, [c for row in candidates for c in row])
        return encode_topk(top)

    def _with_candidates(self, top: TopKLogits, flat: torch.Tensor, per_row: list[list[int]]) -> TopKLogits:
        """`top` with each row's candidate ids and their exact scores appended (padding: the id `columns`)."""
        width = max(len(c) for c in per_row)
        if width == 0:
            return top
        extra = torch.full((len(per_row), width), self.columns, dtype=top.ids.dtype)
        for i, c in enumerate(per_row):
            extra[i, : len(c)] = torch.tensor(c, dtype=top.ids.dtype).clamp_max(self.columns)
        valid = extra < self.columns
        scores = torch.where(valid, flat.gather(1, extra.clamp_max(self.columns - 1).long()), top.bound.unsqueeze(1))
        return TopKLogits(torch.cat([top.ids, extra], 1), torch.cat([top.scores, scores], 1), top.bound, top.lse)


@dataclass
class Work:
    kind: str          # open | step | verify | rewind | keep | exact | more | full | close
    session: Session
    args: dict
    future: Future = field(default_factory=Future)


@dataclass
class Stats:
    """Counters for /metrics (written by the model thread, read by the event loop: plain ints/floats)."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    tokens: int = 0             # rows stepped
    prefill_tokens: int = 0
    forwards: int = 0
    batch_rows_sum: int = 0
    batch_hist: dict[int, int] = field(default_factory=dict)  # batch-size bucket upper bound -> count
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, rows) of recent steps

    def record_step(self, rows: int) -> None:
        self.tokens += rows
        self.forwards += 1
        self.batch_rows_sum += rows
        bucket = next(b for b in BATCH_BUCKETS if rows <= b)
        self.batch_hist[bucket] = self.batch_hist.get(bucket, 0) + 1
        self.recent.append((time.monotonic(), rows))

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, r) for t, r in list(self.recent) if now - t <= window]
        if not recent:
            return 0.0
        return sum(r for _, r in recent) / max(now - recent[0][0], 1e-3)


class Batcher:
    """Owns the model and the pool; `submit(work)` from any thread, results arrive on `work.future`."""

    def __init__(self, model, *, slots: int, max_prompt_tokens: int, max_new_tokens: int):
        self.pool = KVPool(model, slots, max_prompt_tokens + max_new_tokens + 1)
        self.vocab_rows = head_rows(model)
        self.max_prompt_tokens, self.max_new_tokens = max_prompt_tokens, max_new_tokens
        self.stats = Stats()
        self.sessions: dict[int, Session] = {}
        self._q: queue.Queue[Work | None] = queue.Queue()
        self._stopped, self._lock = False, threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pocketlm-serve-model", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> Future:
        with self._lock:  # no item may slip in after the shutdown drain
            if self._stopped:
                work.future.set_exception(ServeError(503, "server shutting down"))
            else:
                self._q.put(work)
        return work.future

    def stop(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def live_rows(self) -> int:
        return self.pool.slots - self.pool.free

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            items = [self._q.get()]
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            if None in items:  # shutdown: refuse whatever is still waiting, now and later
                with self._lock:
                    self._stopped = True
                    self._refuse([w for w in items if w is not None])
                return
            steps = []
            for w in items:
                if w.kind in ("step", "verify"):  # one batched forward, whatever each row appends
                    steps.append(w)
                    continue
                self._settle(w, getattr(self, f"_{w.kind}"), w)
            if steps:
                self._settle_steps(steps)

    def _refuse(self, items: list[Work]) -> None:
        while True:
            try:
                items.append(self._q.get_nowait())
            except queue.Empty:
                break
        for w in items:
            if w is not None:
                w.future.set_exception(ServeError(503, "server shutting down"))

    @staticmethod
    def _settle(w: Work, fn, *args) -> None:
        try:
            w.future.set_result(fn(*args))
        except ServeError as e:
            w.future.set_exception(e)
        except Exception as e:  # a bug or an OOM must reach the client as a 500, never kill the model thread
            log.exception("%s failed (session %d)", w.kind, w.session.id)
            w.future.set_exception(ServeError(500, f"server error in {w.kind}: {type(e).__name__}"))

    def _open(self, w: Work) -> bytes:
        s, a = w.session, w.args
        if s.slots:
            raise ServeError(409, "a session is already open on this connection (close it first)")
        prompts, expand = a["prompts"], a["expand"]
        uniq, back = unique_prompts(prompts)
        rows = [back[e] for e in expand] if expand is not None else back
        if len(rows) > self.pool.free:
            raise ServeError(503, f"server full: {len(rows)} rows asked, {self.pool.free} free")
        s.slots, s.fmt, s.budget = self.pool.take(len(rows)), a["format"], a["max_new_tokens"]
        s.used = [0] * len(rows)
        s.topk, s.columns, s.last = a.get("topk"), a.get("columns") or 0, None
        self.sessions[s.id] = s
        self.stats.sessions_opened += 1
        logits = []
        for j, p in enumerate(uniq):
            mine = [slot for slot, r in zip(s.slots, rows, strict=True) if r == j]
            logits.append(self.pool.prefill(p, mine) if mine else None)
            self.stats.prefill_tokens += len(p)
        return s.encode(torch.cat([logits[r] for r in rows]))

    def _keep(self, w: Work) -> None:
        s, rows = w.session, w.args["rows"]
        if not s.slots:
            raise ServeError(404, "keep: no open session on this connection")
        if rows and rows[-1] >= len(s.slots):
            raise ServeError(400, f"keep: row {rows[-1]} out of range for {len(s.slots)} live rows")
        kept = set(rows)
        self.pool.give_back([slot for r, slot in enumerate(s.slots) if r not in kept])
        s.slots = [s.slots[r] for r in rows]
        s.used = [s.used[r] for r in rows]
        if s.last is not None:
            s.last = s.last[rows]
        if s.verified is not None:
            s.verified = s.verified[rows]

    def _rewind(self, w: Work) -> None:
        s, drop = w.session, w.args["drop"]
        if not s.slots:
            raise ServeError(404, "rewind: no open session on this connection")
        if len(drop) != len(s.slots):
            raise ServeError(400, f"rewind: {len(drop)} counts for {len(s.slots)} live rows")
        try:
            self.pool.rewind(s.slots, drop)
        except PocketLMError as e:
            raise ServeError(400, f"rewind: {e}") from None
        s.used = [u - d for u, d in zip(s.used, drop, strict=True)]
        if s.verified is not None and s.last is not None:
            # `last` becomes each row's newest kept row, so an ask without a position after the next verify is
            # about the row before that verify's ids (a bonus position decided a round later: speculative.py)
            t = s.verified.shape[1]
            for i, d in enumerate(drop):
                if d < t:
                    s.last[i] = s.verified[i, t - 1 - d]

    def _rows_of_last(self, w: Work) -> torch.Tensor:
        """The scores `exact` / `more` / `full` read: the last step's, or position j of the last verify."""
        s, rows, position = w.session, w.args["rows"], w.args.get("position")
        if not s.slots or s.last is None:
            raise ServeError(404, f"{w.kind}: no open top-k session on this connection")
        if max(rows) >= len(s.slots):
            raise ServeError(400, f"{w.kind}: row {max(rows)} out of range for {len(s.slots)} live rows")
        if position is None:
            return s.last
        if s.verified is None or position >= s.verified.shape[1]:
            raise ServeError(400, f"{w.kind}: no verified position {position}")
        return s.verified[:, position]

    def _exact(self, w: Work) -> bytes:
        last = self._rows_of_last(w)
        if any(i >= w.session.columns for ids in w.args["ids"] for i in ids):
            raise ServeError(400, f"exact: ids must be below the session's {w.session.columns} columns")
        vals = [last[r, ids] for r, ids in zip(w.args["rows"], w.args["ids"], strict=True)]
        return encode_scores(torch.cat(vals).view(1, -1), "f32")

    def _more(self, w: Work) -> bytes:
        last, depth = self._rows_of_last(w), w.args["depth"]
        if depth >= w.session.columns:
            raise ServeError(400, f"more: depth must be below the session's {w.session.columns} columns")
        return encode_topk(truncate(last[w.args["rows"]], depth))

    def _full(self, w: Work) -> bytes:
        return encode_scores(self._rows_of_last(w)[w.args["rows"]], "f32")

    def _close(self, w: Work) -> None:
        s = w.session
        if s.slots:
            self.pool.give_back(s.slots)
            s.slots = []
            self.stats.sessions_closed += 1
        self.sessions.pop(s.id, None)

    def _check_step(self, w: Work) -> None:
        s, ids = w.session, w.args["ids"]
        if not s.slots:
            raise ServeError(404, f"{w.kind}: no open session on this connection")
        if len(ids) != len(s.slots):
            raise ServeError(400, f"{w.kind}: {len(ids)} ids for {len(s.slots)} live rows")
        if max(s.used) + (len(ids[0]) if w.kind == "verify" else 1) > s.budget:
            raise ServeError(400, f"{w.kind}: the session's max_new_tokens is used up")

    def _settle_steps(self, steps: list[Work]) -> None:
        ok = []
        for w in steps:
            try:
                self._check_step(w)
                ok.append(w)
            except ServeError as e:
                w.future.set_exception(e)
        if not ok:
            return
        slots = [slot for w in ok for slot in w.session.slots]
        ids = [i if w.kind == "verify" else [i] for w in ok for i in w.args["ids"]]
        try:
            logits = self.pool.extend(slots, ids)
        except Exception as e:
            log.exception("batched step of %d rows failed", len(slots))
            for w in ok:
                w.future.set_exception(ServeError(500, f"server error in step: {type(e).__name__}"))
            return
        self.stats.record_step(len(slots))
        logits = logits.cpu()  # one device-to-host copy for the whole batch (then sliced per session)
        start = 0
        for w in ok:
            n = len(w.session.slots)
            if w.kind == "verify":
                t = len(w.args["ids"][0])
                w.session.used = [u + t for u in w.session.used]
                self._settle(w, w.session.encode_verify, logits[start:start + n, :t], w.args["ids"],
                             w.args.get("candidates"))
            else:
                w.session.used = [u + 1 for u in w.session.used]
                self._settle(w, w.session.encode, logits[start:start + n, 0])
            start += n
