"""The step server's ASGI app: one WebSocket per device client (`steer.wire` describes the messages), plus
`/health` and `/metrics`. Thin glue: validation, auth and limits here; the model work is the `Batcher`'s.

Never logs payloads: log lines name the operation, the session number and the error code only.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, WebSocket
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.websockets import WebSocketDisconnect

from ..steer.cloud.in_process import eos_ids
from ..steer.cloud.wire import (
    FORMATS,
    LAST_AFTER_REWIND,
    MAX_CANDIDATES,
    MAX_TOPK,
    MAX_VERIFY,
    OPS,
    PATH,
    PROTOCOL,
    TOPK,
    tokenizer_fingerprint,
)
from .batcher import BATCH_BUCKETS, Batcher, ServeError, Session, Work

log = logging.getLogger(__name__)


@dataclass
class Limits:
    slots: int = 64                  # KV rows in the pool (all sessions together), allocated at start
    max_rows: int = 16               # rows in one session (a client's batch)
    max_prompt_tokens: int = 2048    # per prompt
    max_new_tokens: int = 512        # steps per session
    ttl_s: float = 300.0             # a connection idle this long is closed and its rows freed

    def max_message_bytes(self) -> int:
        """Largest uplink message a valid client can send (an `open` with max_rows full prompts), with slack."""
        prompts = self.max_rows * self.max_prompt_tokens * 8
        candidates = self.max_rows * MAX_VERIFY * MAX_CANDIDATES * 8  # a verify's candidate ids
        return max(prompts, candidates) + 65536


def _status_close(status: int) -> int:
    return 4000 + status  # WebSocket application close codes mirror the HTTP status


def _candidates(given, rows: int, positions: int, vocab: int) -> list[list[list[int]]] | None:
    """A verify's optional `candidates`: per row, per position, at most MAX_CANDIDATES ids (top-k sessions score
    them exactly; others ignore them)."""
    if given is None:
        return None
    if (not isinstance(given, list) or len(given) != rows
            or any(not isinstance(r, list) or len(r) != positions for r in given)):
        raise ServeError(400, "verify: candidates must hold one list per position for every row")
    out = [[_ints(c, "candidates", 0, vocab) for c in r] for r in given]
    if any(len(c) > MAX_CANDIDATES for r in out for c in r):
        raise ServeError(400, f"verify: at most {MAX_CANDIDATES} candidates per position")
    return out


def _ints(value, name: str, low: int, high: int) -> list[int]:
    if not isinstance(value, list) or not all(type(v) is int for v in value):
        raise ServeError(400, f"{name} must be a list of integers")
    if value and (min(value) < low or max(value) >= high):
        raise ServeError(400, f"{name}: value out of range [{low}, {high})")
    return value


class SteerServer:
    """State shared by the handlers: the batcher, limits, auth token and the hello message."""

    def __init__(self, model, tokenizer, *, name: str, token: str | None, limits: Limits):
        self.limits, self.token = limits, token
        self.batcher = Batcher(model, slots=limits.slots, max_prompt_tokens=limits.max_prompt_tokens,
                               max_new_tokens=limits.max_new_tokens)
        self.vocab_rows = self.batcher.vocab_rows
        self.hello = {"server": "pocketlm", "protocol": PROTOCOL, "model": name, "vocab_rows": self.vocab_rows,
                      "eos_token_ids": sorted(eos_ids(model, tokenizer)),
                      "tokenizer": tokenizer_fingerprint(tokenizer), "formats": [*FORMATS, TOPK],
                      "limits": {"max_rows": limits.max_rows, "max_prompt_tokens": limits.max_prompt_tokens,
                                 "max_new_tokens": limits.max_new_tokens, "ttl_s": limits.ttl_s,
                                 "max_candidates": MAX_CANDIDATES},
                      # a rewind after a verify makes the newest kept row the one asks without a position read
                      "features": [LAST_AFTER_REWIND]}
        self._ids = itertools.count(1)
        self.connections = 0
        self.errors: dict[int, int] = {}

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), self.token.encode())

    def parse(self, text: str) -> tuple[str, dict]:
        """One uplink message -> (op, checked arguments); ServeError(400) for anything malformed."""
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            raise ServeError(400, "malformed message: not JSON") from None
        if not isinstance(msg, dict) or msg.get("op") not in OPS:
            raise ServeError(400, f"unknown op; expected one of {', '.join(OPS)}")
        op, lim, V = msg["op"], self.limits, self.vocab_rows
        if op == "step":
            return op, {"ids": _ints(msg.get("ids"), "ids", 0, V)}
        if op == "verify":
            ids = msg.get("ids")
            if not isinstance(ids, list) or not ids or len(ids) > lim.max_rows:
                raise ServeError(400, "verify: ids must be one list of ids per live row")
            rows = [_ints(i, "ids", 0, V) for i in ids]
            if not 1 <= len(rows[0]) <= MAX_VERIFY or any(len(r) != len(rows[0]) for r in rows):
                raise ServeError(400, f"verify: every row needs the same number of ids, 1..{MAX_VERIFY}")
            return op, {"ids": rows, "candidates": _candidates(msg.get("candidates"), len(rows), len(rows[0]), V)}
        if op == "rewind":
            return op, {"drop": _ints(msg.get("drop"), "drop", 0, MAX_VERIFY)}
        if op == "keep":
            rows = _ints(msg.get("rows"), "rows", 0, lim.max_rows)
            if any(b <= a for a, b in zip(rows, rows[1:], strict=False)):
                raise ServeError(400, "rows must be strictly increasing")
            return op, {"rows": rows}
        if op == "close":
            return op, {}
        if op in ("exact", "more", "full"):
            rows = _ints(msg.get("rows"), "rows", 0, lim.max_rows)
            if not rows:
                raise ServeError(400, f"{op}: rows must name at least one live row")
            position = msg.get("position")
            if position is not None and (type(position) is not int or not 0 <= position < MAX_VERIFY):
                raise ServeError(400, f"{op}: position must be an integer in 0..{MAX_VERIFY - 1}")
            if op == "full":
                return op, {"rows": rows, "position": position}
            if op == "more":
                depth = msg.get("depth")
                if type(depth) is not int or not 1 <= depth < V:
                    raise ServeError(400, f"more: depth must be an integer in 1..{V - 1}")
                return op, {"rows": rows, "depth": depth, "position": position}
            ids = msg.get("ids")
            if not isinstance(ids, list) or len(ids) != len(rows):
                raise ServeError(400, "exact: ids must be one list of ids per row")
            return op, {"rows": rows, "ids": [_ints(i, "ids", 0, V) for i in ids], "position": position}
        return op, self._parse_open(msg)

    def _parse_open(self, msg: dict) -> dict:
        """An `open`'s prompts, expansion, format and budget, checked against the limits."""
        lim, V = self.limits, self.vocab_rows
        prompts = msg.get("prompts")
        if not isinstance(prompts, list) or not prompts or len(prompts) > lim.max_rows:
            raise ServeError(400, f"prompts must be a list of 1..{lim.max_rows} token-id lists")
        for p in prompts:
            _ints(p, "prompt", 0, V)
            if not 1 <= len(p) <= lim.max_prompt_tokens:
                raise ServeError(413, f"a prompt must have 1..{lim.max_prompt_tokens} tokens, got {len(p)}")
        expand = msg.get("expand")
        if expand is not None:
            expand = _ints(expand, "expand", 0, len(prompts))
            if not 1 <= len(expand) <= lim.max_rows:
                raise ServeError(400, f"expand must name 1..{lim.max_rows} rows")
        fmt = msg.get("format", "f32")
        if fmt not in FORMATS and fmt != TOPK:
            raise ServeError(400, f"unknown format {fmt!r}; this server sends {', '.join([*FORMATS, TOPK])}")
        topk = columns = None
        if fmt == TOPK:
            columns = msg.get("columns", V)
            if type(columns) is not int or not 2 <= columns <= V:
                raise ServeError(400, f"columns must be an integer in 2..{V}")
            topk = msg.get("topk")
            if type(topk) is not int or not 1 <= topk < min(columns, MAX_TOPK + 1):
                raise ServeError(400, f"topk must be an integer in 1..{min(columns - 1, MAX_TOPK)}")
        n = msg.get("max_new_tokens", lim.max_new_tokens)
        if type(n) is not int or not 1 <= n <= lim.max_new_tokens:
            raise ServeError(400, f"max_new_tokens must be an integer in 1..{lim.max_new_tokens}")
        return {"prompts": prompts, "expand": expand, "format": fmt, "max_new_tokens": n, "topk": topk,
                    "columns": columns}

    async def serve(self, ws: WebSocket) -> None:
        if not self.authorized(ws.headers.get("authorization")):
            self.errors[401] = self.errors.get(401, 0) + 1
            await ws.send_denial_response(PlainTextResponse("missing or wrong bearer token", status_code=401,
                                                            headers={"WWW-Authenticate": "Bearer"}))
            return
        await ws.accept()
        session = Session(next(self._ids))
        self.connections += 1
        try:
            await ws.send_text(json.dumps(self.hello))
            await self._loop(ws, session)
        except ServeError as e:
            self.errors[e.status] = self.errors.get(e.status, 0) + 1
            log.info("session %d: refused (%d)", session.id, e.status)
            await _try(ws.send_text(json.dumps({"error": str(e), "code": e.status})))
            await _try(ws.close(_status_close(e.status), str(e)[:120]))
        except WebSocketDisconnect:
            pass
        except Exception as e:  # the peer vanished mid-send, or a bug: end this connection only
            log.info("session %d: connection ended (%s)", session.id, type(e).__name__)
        finally:
            self.connections -= 1
            await asyncio.wrap_future(self.batcher.submit(Work("close", session, {})))

    async def _loop(self, ws: WebSocket, session: Session) -> None:
        while True:
            try:
                msg = await asyncio.wait_for(ws.receive(), timeout=self.limits.ttl_s)
            except TimeoutError:
                raise ServeError(408, f"idle for {self.limits.ttl_s:g} s; session closed") from None
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is None:
                raise ServeError(400, "binary uplink messages are not accepted (send JSON text)")
            op, args = self.parse(msg["text"])
            # after a close the same Session (one per connection) may open again for the next generation
            result = await asyncio.wrap_future(self.batcher.submit(Work(op, session, args)))
            if result is not None:
                await ws.send_bytes(result)

    def metrics(self) -> str:
        st, b = self.stats, self.batcher
        lines = [
            "# TYPE pocketlm_sessions gauge", f"pocketlm_sessions {len(b.sessions)}",
            "# TYPE pocketlm_connections gauge", f"pocketlm_connections {self.connections}",
            "# TYPE pocketlm_kv_rows gauge", f"pocketlm_kv_rows {b.live_rows}",
            "# TYPE pocketlm_kv_rows_capacity gauge", f"pocketlm_kv_rows_capacity {b.pool.slots}",
            "# TYPE pocketlm_sessions_opened_total counter", f"pocketlm_sessions_opened_total {st.sessions_opened}",
            "# TYPE pocketlm_tokens_total counter", f"pocketlm_tokens_total {st.tokens}",
            "# TYPE pocketlm_prefill_tokens_total counter", f"pocketlm_prefill_tokens_total {st.prefill_tokens}",
            "# TYPE pocketlm_tokens_per_second gauge", f"pocketlm_tokens_per_second {st.tokens_per_s():.3f}",
            "# TYPE pocketlm_batch_rows histogram",
        ]
        total = 0
        for bound in BATCH_BUCKETS[:-1]:
            total += st.batch_hist.get(bound, 0)
            lines.append(f'pocketlm_batch_rows_bucket{{le="{bound}"}} {total}')
        lines += [f'pocketlm_batch_rows_bucket{{le="+Inf"}} {st.forwards}',
                  f"pocketlm_batch_rows_sum {st.batch_rows_sum}", f"pocketlm_batch_rows_count {st.forwards}",
                  "# TYPE pocketlm_refused_total counter"]
        lines += [f'pocketlm_refused_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())]
        return "\n".join(lines) + "\n"

    @property
    def stats(self):
        return self.batcher.stats


async def _try(coro) -> None:
    try:
        await coro
    except Exception:  # the peer may be gone already
        pass


def create_app(model, tokenizer, *, name: str = "model", token: str | None = None,
               limits: Limits | None = None) -> FastAPI:
    """The ASGI app; `app.state.server` holds the `SteerServer` (its batcher thread runs until shutdown)."""
    server = SteerServer(model, tokenizer, name=name, token=token, limits=limits or Limits())
    @asynccontextmanager
    async def lifespan(_app):
        yield
        server.batcher.stop()

    app = FastAPI(title="pocketlm step server", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.server = server

    @app.websocket(PATH)
    async def steer(ws: WebSocket) -> None:
        await server.serve(ws)

    @app.get("/health")
    def health() -> JSONResponse:
        ok = server.batcher.alive
        return JSONResponse({"status": "ok" if ok else "model thread down", "model": name,
                             "sessions": len(server.batcher.sessions), "free_rows": server.batcher.pool.free},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    return app
