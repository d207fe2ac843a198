"""`RemoteCloud`: the cloud model behind a `pocketlm serve` step server, as one more `CloudBackend`.

Only session operations and token ids go up (the public query's chat-prompt ids once, then one chosen id per
row per step); next-token scores come down as one binary frame per step (`wire.py`). Every wait is bounded:
connecting by `connect_timeout`, each answer by `timeout`; a lost connection or a server restart raises
`RemoteCloudError` at once (the socket closes), a silent server after `timeout` s. It never hangs.
"""

from __future__ import annotations

import json
import logging
import threading

import torch
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.sync.client import connect

from ..downlink.certify import NotCertifiable
from ..downlink.topk import TopKLogits, Truncating
from . import wire
from .wire import RemoteCloudError

log = logging.getLogger(__name__)


def ws_url(url: str) -> str:
    url = url.rstrip("/")
    for http, ws in (("http://", "ws://"), ("https://", "wss://")):
        if url.startswith(http):
            url = ws + url[len(http):]
    return url + wire.PATH


class RemoteCloud:
    """`CloudBackend` over a WebSocket to a step server. `tokenizer`: the device's, checked against the server's
    (CoSteer feeds the same ids to both models, so a different tokenizer is refused). `format`: the score
    payload, `f32` (exact) or `f16`/`bf16` (half the downlink). `bytes_up`/`bytes_down` count message payloads."""

    def __init__(self, url: str, token: str | None = None, *, tokenizer=None, format: str = "f32",
                 connect_timeout: float = 10.0, timeout: float = 60.0):
        if format not in wire.FORMATS:
            raise RemoteCloudError(f"unknown score format {format!r}; choose from {', '.join(wire.FORMATS)}")
        self.url, self.format, self.timeout = url, format, timeout
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self._ws = connect(ws_url(url), additional_headers=headers, compression=None, proxy=None, legacy=True,
                               open_timeout=connect_timeout, close_timeout=2, max_size=2**31,
                               ping_interval=20, ping_timeout=20, user_agent_header=None)
        except InvalidStatus as e:
            code = e.response.status_code
            why = "missing or wrong token (--cloud-token)" if code == 401 else "refused"
            raise RemoteCloudError(f"step server at {url} answered HTTP {code}: {why}") from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as e:
            raise RemoteCloudError(f"cannot reach a step server at {url}: {type(e).__name__}: {e}") from None
        self.bytes_up = self.bytes_down = self.messages_up = self.messages_down = 0
        self._count_lock = threading.Lock()  # a pipelined ask is sent while the worker thread reads
        self._sent_cv = threading.Condition()
        self._sent_seq = 0  # steps and verifies sent so far
        self._pending: list[tuple[list[int], list[int], int]] = []  # asks sent ahead, unread: rows, lengths, n
        hello = self._recv()
        if not isinstance(hello, str):
            raise RemoteCloudError(f"{url} is not a pocketlm step server (no hello)")
        info = json.loads(hello)
        if info.get("server") != "pocketlm" or info.get("protocol") != wire.PROTOCOL:
            raise RemoteCloudError(f"{url} speaks protocol {info.get('protocol')!r}, this client {wire.PROTOCOL}")
        self.info = info
        self.model_name = info["model"]
        self.vocab_rows = int(info["vocab_rows"])
        self.eos_token_ids = {int(i) for i in info["eos_token_ids"]}
        self.limits = info["limits"]
        self._new_tokens = self.limits["max_new_tokens"]
        if tokenizer is not None:
            self.check_tokenizer(tokenizer)

    def check_tokenizer(self, tokenizer) -> None:
        if wire.tokenizer_fingerprint(tokenizer) != self.info["tokenizer"]:
            raise RemoteCloudError(f"the step server's tokenizer ({self.model_name}) differs from the device "
                                   "model's; steering needs one shared tokenizer (the same ids on both sides)")

    # -- transport ----------------------------------------------------------------------------
    def _send(self, text: str, ahead: bool = False) -> None:
        if self._pending and not ahead:
            raise RemoteCloudError("internal: an ask sent ahead was not collected before the next request")
        try:
            self._ws.send(text)
        except ConnectionClosed as e:
            raise self._lost(e) from None
        with self._count_lock:
            self.bytes_up += len(text.encode())
            self.messages_up += 1

    def _sent_request(self) -> None:
        """An open, step or verify went up: an ask waiting to follow it may go now."""
        with self._sent_cv:
            self._sent_seq += 1
            self._sent_cv.notify_all()

    def sent_count(self) -> int:
        with self._sent_cv:
            return self._sent_seq

    def _recv(self) -> str | bytes:
        try:
            msg = self._ws.recv(timeout=self.timeout)
        except TimeoutError:
            raise RemoteCloudError(f"step server at {self.url} did not answer within {self.timeout:g} s") from None
        except ConnectionClosed as e:
            raise self._lost(e) from None
        with self._count_lock:
            self.bytes_down += len(msg)
            self.messages_down += 1
        return msg

    def _lost(self, e: ConnectionClosed) -> RemoteCloudError:
        rcvd = e.rcvd
        why = f"{rcvd.code} {rcvd.reason}".strip() if rcvd is not None else "no close frame"
        return RemoteCloudError(f"connection to the step server at {self.url} lost ({why})")

    def _open_fields(self) -> dict:
        return {"format": self.format}

    def _scores(self) -> torch.Tensor:
        msg = self._recv()
        if isinstance(msg, str):
            err = json.loads(msg)
            raise RemoteCloudError(f"step server refused: {err.get('error')} ({err.get('code')})")
        return wire.decode_scores(msg)

    # -- CloudBackend -------------------------------------------------------------------------
    def cache_modes(self) -> tuple[str, ...]:
        """The server decodes with its own KV pool: one mode, nothing for the device to choose."""
        return ("server",)

    def set_cache_mode(self, mode: str) -> None:
        if mode not in ("auto", "server"):
            raise RemoteCloudError(f"a step server decodes with its own KV pool; kv={mode!r} applies to the device only")

    def reserve(self, new_tokens: int) -> None:
        if new_tokens > self.limits["max_new_tokens"]:
            raise RemoteCloudError(f"{new_tokens} new tokens asked; the step server allows "
                                   f"{self.limits['max_new_tokens']} per session")
        self._new_tokens = new_tokens

    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> torch.Tensor:
        self._send(wire.op("open", prompts=[list(map(int, p)) for p in prompts], expand=expand,
                           max_new_tokens=self._new_tokens, **self._open_fields()))
        self._sent_request()
        return self._scores()

    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self._send(wire.op("step", ids=token_ids.view(-1).tolist()))
        self._sent_request()
        return self._scores()

    def extend(self, token_ids: torch.Tensor, candidates: list | None = None,
               behind: list[tuple[int | None, list[list[int]]]] | None = None) -> list:
        """One `verify` round trip: T ids per live row up, T score rows per live row down (every format).
        `candidates` (top-k only): per row and position, ids whose exact scores should come with the rows.
        `behind` (top-k only): asks that go up right behind the verify, in order, each (position, per live row
        ids): position j of this verify, or None for the row before its ids (a bonus position decided a round
        later, speculative.py); `collect_ahead` reads their answers in the same order. They leave before the
        verify counts as sent, so an ask waiting on it (`ask_ahead`) can only follow them."""
        b, t = token_ids.shape
        extra = {} if candidates is None else {"candidates": candidates}
        self._send(wire.op("verify", ids=token_ids.tolist(), **extra))
        for position, ids in behind or ():
            if not self._ask_now(ids, position):
                raise RemoteCloudError("internal: an ask to follow a verify had nothing to ask")
        self._sent_request()
        scores = self._scores()
        index = torch.arange(b) * t
        return [scores[index + j] for j in range(t)]

    def rewind(self, drop: torch.Tensor) -> None:
        self._send(wire.op("rewind", drop=drop.view(-1).tolist()))

    def keep(self, rows: torch.Tensor) -> None:
        self._send(wire.op("keep", rows=rows.view(-1).tolist()))

    def release(self) -> None:
        self._send(wire.op("close"))

    def close(self) -> None:
        """Close the connection (the server frees anything still open)."""
        self._ws.close()

    def __enter__(self) -> RemoteCloud:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


VERIFY_CANDIDATES = 16
AHEAD_WAIT_S = 5.0  # how long an ask sent ahead waits for the request it follows to have gone up


class RemoteTopK(Truncating, RemoteCloud):
    """`RemoteCloud` with the certified top-k downlink (a `PartialCloud`): each step brings the k best ids and
    their logits plus a bound, about 8k bytes per row instead of 4V; the engine asks `exact` for the few ids the
    top-k cannot rule out (steer/certify.py), so greedy tokens equal the full-vocabulary ones. Those candidate
    ids go up and say which tokens the device's delta favours; `ask=False` never sends them (such a step takes
    the best known token and counts as uncertified)."""

    def __init__(self, url: str, token: str | None = None, *, k: int = 64, ask: bool = True, **kw):
        super().__init__(url, token, **kw)
        if wire.TOPK not in self.info.get("formats", []):
            raise RemoteCloudError(f"the step server at {url} has no top-k downlink (formats: {self.info.get('formats')})")
        if not 1 <= k <= wire.MAX_TOPK:
            raise RemoteCloudError(f"top-k must be in 1..{wire.MAX_TOPK}, got {k}")
        self.k, self.ask = k, ask
        self.columns = self.vocab_rows  # the engine narrows it to the fused vocabulary
        # per verified position, the ids the device's delta favours most go up with the verify, so that asks
        # about them ride in its round trip (never with ask=False: then no candidate id leaves the device): at
        # least VERIFY_CANDIDATES, more where the device expects certification to need them (downlink/candidates.py)
        self.verify_candidates = VERIFY_CANDIDATES if ask else 0
        limit = self.info.get("limits", {}).get("max_candidates", wire.OLD_MAX_CANDIDATES)
        self.max_verify_candidates = min(wire.MAX_CANDIDATES, int(limit)) if ask else 0
        # the server's `last` follows a rewind: a verify's bonus position may be decided a round later, its asks
        # riding behind the next verify (steer/deferred.py)
        self.defers_bonus = ask and wire.LAST_AFTER_REWIND in self.info.get("features", [])

    def _open_fields(self) -> dict:
        return {"format": wire.TOPK, "topk": self.k, "columns": self.columns}

    @staticmethod
    def _at(position: int | None) -> dict:
        return {} if position is None else {"position": int(position)}

    def exact(self, rows: list[int], ids: list[list[int]], position: int | None = None) -> list[torch.Tensor]:
        if not self.ask:
            raise NotCertifiable("candidate ids stay on the device (topk:K:noexact)")
        self._send(wire.op("exact", rows=list(rows), ids=[list(map(int, i)) for i in ids], **self._at(position)))
        flat = self._scores().view(-1)
        return list(flat.split([len(i) for i in ids]))

    def ask_ahead(self, ids: list[list[int]], *, after: int, position: int | None = None) -> bool:
        """Send an `exact` ask for each live row's `ids` (empty: none) once the request after the first `after`
        (the step or verify in flight, sent from the worker thread) has gone up, without waiting for an answer:
        the server answers a session's messages in order, so this answer follows that request's and
        `collect_ahead` reads it (downlink/pipelined.py). False (nothing sent) when asking is off or no row asks."""
        if not self.ask or not any(ids):
            return False
        with self._sent_cv:  # the worker sends at once; if it has not within seconds it failed: ask on demand
            if not self._sent_cv.wait_for(lambda: self._sent_seq > after, timeout=min(self.timeout, AHEAD_WAIT_S)):
                return False
        return self._ask_now(ids, position)

    def _ask_now(self, ids: list[list[int]], position: int | None) -> bool:
        rows = [p for p, i in enumerate(ids) if i]
        if not self.ask or not rows:
            return False
        self._send(wire.op("exact", rows=rows, ids=[list(map(int, ids[p])) for p in rows], **self._at(position)),
                   ahead=True)
        self._pending.append((rows, [len(ids[p]) for p in rows], len(ids)))
        return True

    def collect_ahead(self) -> list[torch.Tensor]:
        """The oldest ask sent ahead: per live row of that ask, the exact logits of its ids (empty for rows that
        asked nothing)."""
        rows, lengths, n = self._pending[0]
        msg = self._recv()
        self._pending.pop(0)
        if isinstance(msg, str):
            err = json.loads(msg)
            raise RemoteCloudError(f"step server refused: {err.get('error')} ({err.get('code')})")
        flat = wire.decode_scores(msg).view(-1)
        out = [torch.zeros(0)] * n
        for p, s in zip(rows, flat.split(lengths), strict=True):
            out[p] = s
        return out

    def more(self, rows: list[int], depth: int, position: int | None = None) -> TopKLogits:
        self._send(wire.op("more", rows=list(rows), depth=int(depth), **self._at(position)))
        top = self._scores()
        if not isinstance(top, TopKLogits):
            raise RemoteCloudError("step server answered 'more' without a top-k frame")
        return top

    def full(self, rows: list[int], position: int | None = None) -> torch.Tensor:
        if not self.ask:
            raise NotCertifiable("full rows are not fetched with topk:K:noexact")
        self._send(wire.op("full", rows=list(rows), **self._at(position)))
        return self._scores()
