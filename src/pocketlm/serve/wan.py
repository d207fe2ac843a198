"""A WAN you can run on one machine: a loopback TCP proxy that holds every chunk for a fixed one-way time.

Why a fixed per-chunk delay: the protocols this project measures (the step server's WebSocket session, an
OpenAI-compatible server over HTTP/1.1 keep-alive) are request/response. What a WAN costs them is dominated by
latency: a request waits rtt/2 to reach the cloud and the answer waits rtt/2 to come back, so every dependent
exchange costs one round trip however small it is. Delaying each chunk of bytes by rtt/2 in each direction,
stamped when the proxy reads it and released at exactly that stamp plus rtt/2 (never "rtt/2 after the previous
chunk went out"), reproduces that: order is kept per direction, pipelined chunks stay pipelined, and a
request/response costs one RTT. It is byte-level, so HTTP, WebSocket upgrades and keep-alive all pass through.

Bandwidth (`mbit_s`, optional): each direction is then a link that sends one chunk at a time at that rate, so a
chunk leaves once the link is free and its bytes have been serialised (len * 8 / rate), and arrives one way after
that. Without it bytes move at loopback speed once due: a latency-only link, on which a format that sends 200 KB a
token costs what one that sends 1 KB does.

What it does not model: jitter (the delay is constant), loss
and retransmission, TCP slow start, and connection setup (a real TCP handshake costs one more RTT before the
first byte, TLS more; here the client's connect completes locally and only its bytes are delayed). Counters
(`bytes_up`, `bytes_down`, `messages_up`, `messages_down`) count what crossed the "link", for per-token costs;
a "message" is one chunk as read from the socket, which is usually but not always one application message.

No root, no netem: pure asyncio on a background thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from numbers import Real

from ..errors import PocketLMError

log = logging.getLogger(__name__)

_EOF = object()    # the source half-closed: write_eof on the destination once due
_RESET = object()  # the source failed: abort the whole connection once due (after the bytes before it)
_UP, _DOWN = "up", "down"


class _PeerFailed(Exception):
    """A reader hit an error; its writer raises this at the error's due time to abort the connection."""


class _Pipe:
    """One direction: a FIFO of (due_time, chunk) and a cap on bytes held, so a receiver that stops reading
    pushes back on the sender (TCP flow control) instead of growing the proxy's memory without bound."""

    def __init__(self, cap: int):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.free = 0.0  # when the link (bandwidth model) has sent everything queued so far
        self.held = 0
        self.cap = cap
        self.room = asyncio.Event()
        self.room.set()

    async def put(self, due: float, item) -> None:
        self.queue.put_nowait((due, item))
        if isinstance(item, bytes):
            self.held += len(item)
            if self.held >= self.cap:
                self.room.clear()
                await self.room.wait()

    def release(self, n: int) -> None:
        self.held -= n
        if self.held < self.cap:
            self.room.set()


def _check_port(name: str, port, low: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise PocketLMError(f"{name} must be an integer port in {low}..65535, got {port!r}")
    return port


class DelayProxy:
    """Forward every connection on `listen_host:listen_port` (0 = a free port) to `target_host:target_port`,
    each chunk held `rtt_ms / 2` in each direction. `with DelayProxy(...) as p:` or `start()` / `stop()`;
    `p.port`, `p.url` (http://) and `p.ws_url` (ws://) once started."""

    def __init__(self, target_host: str, target_port: int, rtt_ms: float, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, *, connect_timeout_s: float = 5.0, read_size: int = 65536,
                 max_buffer_bytes: int = 64 << 20, mbit_s: float | None = None):
        if mbit_s is not None and (isinstance(mbit_s, bool) or not isinstance(mbit_s, Real)
                                   or not math.isfinite(mbit_s) or mbit_s <= 0):
            raise PocketLMError(f"mbit_s must be a finite number of Mbit/s > 0 (or None: unlimited), got {mbit_s!r}")
        self.mbit_s = None if mbit_s is None else float(mbit_s)
        if isinstance(rtt_ms, bool) or not isinstance(rtt_ms, Real) or not math.isfinite(rtt_ms) or rtt_ms < 0:
            raise PocketLMError(f"rtt_ms must be a finite number of milliseconds >= 0, got {rtt_ms!r}")
        if not isinstance(target_host, str) or not target_host:
            raise PocketLMError(f"target_host must be a host name or address, got {target_host!r}")
        self.target_host = target_host
        self.target_port = _check_port("target_port", target_port, 1)
        self.listen_host = listen_host
        self.listen_port = _check_port("listen_port", listen_port, 0)
        self.rtt_ms = float(rtt_ms)
        self.one_way_s = self.rtt_ms / 2000.0
        self.connect_timeout_s = connect_timeout_s
        self.read_size = read_size
        self.max_buffer_bytes = max_buffer_bytes
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._port: int | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        self.reset_counts()

    # ---- counters (read from any thread; updated on the proxy's loop) ----

    def reset_counts(self) -> None:
        """Zero the byte, chunk and connection counters (e.g. between benchmark configurations)."""
        with self._lock:
            self._bytes = {_UP: 0, _DOWN: 0}
            self._messages = {_UP: 0, _DOWN: 0}
            self._connections = 0

    def _count(self, direction: str, n: int) -> None:
        with self._lock:
            self._bytes[direction] += n
            self._messages[direction] += 1

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client -> target (counted as they leave the delay, before the write)."""
        return self._bytes[_UP]

    @property
    def bytes_down(self) -> int:
        """Bytes delivered target -> client."""
        return self._bytes[_DOWN]

    @property
    def messages_up(self) -> int:
        """Chunks delivered client -> target (one per socket read on the proxy)."""
        return self._messages[_UP]

    @property
    def messages_down(self) -> int:
        return self._messages[_DOWN]

    @property
    def connections(self) -> int:
        """Client connections relayed to the target since the last `reset_counts()`."""
        return self._connections

    @property
    def active_connections(self) -> int:
        return len(self._conn_tasks)

    def counts(self) -> dict:
        """A consistent snapshot of every counter."""
        with self._lock:
            return {"bytes_up": self._bytes[_UP], "bytes_down": self._bytes[_DOWN],
                    "messages_up": self._messages[_UP], "messages_down": self._messages[_DOWN],
                    "connections": self._connections}

    # ---- address ----

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._port is not None

    @property
    def port(self) -> int:
        if self._port is None:
            raise PocketLMError("the delay proxy is not running: call start() or use it as a context manager")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.listen_host}:{self.port}"

    def __repr__(self) -> str:
        where = f"{self.listen_host}:{self._port}" if self._port is not None else "stopped"
        link = "" if self.mbit_s is None else f", {self.mbit_s:g} Mbit/s"
        return f"DelayProxy({where} -> {self.target_host}:{self.target_port}, rtt={self.rtt_ms:g} ms{link})"

    # ---- lifecycle (caller's thread) ----

    def start(self, timeout_s: float = 10.0) -> DelayProxy:
        """Bind and serve on a background thread; returns once the port is listening (or raises)."""
        if self.running:
            return self
        self._ready = threading.Event()
        self._start_error = None
        self._port = None
        self._thread = threading.Thread(target=self._run, name="pocketlm-wan-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise PocketLMError(f"delay proxy did not start within {timeout_s:g} s")
        if self._start_error is not None:
            err = self._start_error
            self._thread.join(timeout_s)
            self._thread = None
            raise PocketLMError(f"delay proxy could not listen on {self.listen_host}:{self.listen_port}: {err}") \
                from err
        log.info("delay proxy %s:%d -> %s:%d, rtt %g ms (%g ms each way)", self.listen_host, self._port,
                 self.target_host, self.target_port, self.rtt_ms, self.rtt_ms / 2)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, close every relayed connection (pending delayed bytes are dropped) and join the
        thread. Idempotent. Raises PocketLMError if the thread is still alive after `timeout_s`."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and thread.is_alive():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop already closed: the thread is on its way out
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            raise PocketLMError(f"delay proxy thread did not stop within {timeout_s:g} s")
        self._thread = None
        self._loop = None
        self._stopping = None
        self._port = None
        log.info("delay proxy to %s:%d stopped", self.target_host, self.target_port)

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the event loop (proxy thread) ----

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to start() or logged; the thread must end cleanly
            if not self._ready.is_set():
                self._start_error = e
            else:
                log.exception("delay proxy event loop failed")
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(self._accept, self.listen_host, self.listen_port)
        except OSError as e:
            self._start_error = e
            self._ready.set()
            return
        self._port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            while self._conn_tasks:  # every accepted connection registered its task synchronously
                tasks = list(self._conn_tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    def _accept(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        """A plain (not async) callback, so the connection's task is ours: registered at once (stop() cannot
        miss it) and cancelled quietly (asyncio's wrapper for an async callback logs a cancelled task as an
        error in 3.11)."""
        task = asyncio.get_running_loop().create_task(self._handle(creader, cwriter))
        self._conn_tasks.add(task)
        task.add_done_callback(functools.partial(self._conn_done, cwriter))

    def _conn_done(self, cwriter: asyncio.StreamWriter, task: asyncio.Task) -> None:
        self._conn_tasks.discard(task)
        cwriter.transport.abort()  # a no-op once closed; closes a connection cancelled before it ever ran
        if not task.cancelled() and task.exception() is not None:
            log.error("delay proxy: connection handler failed", exc_info=task.exception())

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        peer = cwriter.get_extra_info("peername")
        twriter = None
        graceful = False
        try:
            if self._stopping is None or self._stopping.is_set():
                return
            try:
                async with asyncio.timeout(self.connect_timeout_s):
                    treader, twriter = await asyncio.open_connection(self.target_host, self.target_port)
            except (OSError, TimeoutError) as e:
                log.warning("delay proxy: cannot reach target %s:%d for client %s (%s); closing the client",
                            self.target_host, self.target_port, peer, e or type(e).__name__)
                return
            with self._lock:
                self._connections += 1
            log.debug("delay proxy: %s connected", peer)
            graceful = await self._relay(creader, cwriter, treader, twriter, peer)
        finally:
            writers = [w for w in (cwriter, twriter) if w is not None]
            try:
                if graceful:
                    for w in writers:
                        w.close()
                    async with asyncio.timeout(1.0):
                        for w in writers:
                            try:
                                await w.wait_closed()
                            except OSError:
                                pass
            except TimeoutError:
                pass
            finally:
                for w in writers:  # a no-op on a transport that closed cleanly above
                    w.transport.abort()
            log.debug("delay proxy: %s closed (%s)", peer, "clean" if graceful else "aborted")

    async def _relay(self, creader, cwriter, treader, twriter, peer) -> bool:
        """Pump both directions until both have half-closed (True) or either side fails (False)."""
        up, down = _Pipe(self.max_buffer_bytes), _Pipe(self.max_buffer_bytes)
        tasks = [asyncio.create_task(self._collect(creader, up)),
                 asyncio.create_task(self._deliver(up, twriter, _UP)),
                 asyncio.create_task(self._collect(treader, down)),
                 asyncio.create_task(self._deliver(down, cwriter, _DOWN))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
            if failed:
                log.debug("delay proxy: %s closing both sides after %r", peer, failed[0])
            return not failed
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, src: asyncio.StreamReader, pipe: _Pipe) -> None:
        """Read chunks as they arrive and stamp each with its own due time (now + one way; with a bandwidth,
        once the link has serialised it behind the chunks before it)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await src.read(self.read_size)
                due = loop.time() + self.one_way_s
                if self.mbit_s is not None and data:
                    pipe.free = max(loop.time(), pipe.free) + len(data) * 8 / (self.mbit_s * 1e6)
                    due = pipe.free + self.one_way_s
                if not data:
                    await pipe.put(due, _EOF)
                    return
                await pipe.put(due, data)
        except OSError as e:  # reset by the peer, etc.: the other side learns of it one way later
            await pipe.put(loop.time() + self.one_way_s, _RESET)
            log.debug("delay proxy: read failed (%r)", e)

    async def _deliver(self, pipe: _Pipe, dst: asyncio.StreamWriter, direction: str) -> None:
        """Write each chunk at its due time, in order; later chunks keep their own (earlier-stamped) times."""
        loop = asyncio.get_running_loop()
        while True:
            due, item = await pipe.queue.get()
            while (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if item is _EOF:
                await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()  # half-close: the peer reads EOF and may still send the other way
                return
            if item is _RESET:
                raise _PeerFailed(f"{'client' if direction == _UP else 'target'} side failed")
            self._count(direction, len(item))
            dst.write(item)
            pipe.release(len(item))
            await dst.drain()
