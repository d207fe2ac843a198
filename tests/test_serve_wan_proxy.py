"""The loopback WAN (`pocketlm.serve.wan.DelayProxy`): a request/response through it costs one RTT, bytes arrive
intact and in order, connections are independent, counters count, half-close and failures propagate, a dead
target is survived, and stop() leaves nothing running. Loopback only; every wait is bounded."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading
import time

import pytest

from pocketlm.errors import PocketLMError
from pocketlm.serve.wan import DelayProxy

SLACK_S = 0.3  # generous: the test machine's cores are shared


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := sock.recv(65536):
            sock.sendall(data)
        # socketserver then shuts the write side and closes: the client sees EOF after the last echo


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class EchoServer:
    def __init__(self, port: int = 0, handler=_Echo):
        self.server = _Server(("127.0.0.1", port), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="test-echo", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def echo():
    with EchoServer() as server:
        yield server


def connect(proxy: DelayProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def round_trips(sock: socket.socket, n: int, payload: bytes = b"ping-0123") -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        sock.sendall(payload)
        assert recv_exact(sock, len(payload)) == payload
        times.append(time.perf_counter() - t0)
    return times


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pocketlm-wan-proxy"]


def test_a_request_response_costs_one_round_trip(echo):
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=200) as proxy, connect(proxy) as sock:
        times = round_trips(sock, 5)
    assert min(times) >= 0.2, times
    assert max(times) < 0.2 + SLACK_S, times


def test_rtt_zero_is_fast(echo):
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=0) as proxy, connect(proxy) as sock:
        times = round_trips(sock, 20)
    assert max(times) < 0.1, times


def test_a_megabyte_each_way_arrives_identical_and_is_counted(echo):
    payload = os.urandom(1 << 20)
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=50) as proxy, connect(proxy) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = recv_exact(sock, len(payload))
        sender.join(5)
        counts = proxy.counts()
    assert got == payload
    assert counts["bytes_up"] == counts["bytes_down"] == len(payload)
    assert counts["messages_up"] >= len(payload) // proxy.read_size
    assert counts["messages_down"] >= len(payload) // proxy.read_size
    assert counts["connections"] == 1


def test_a_bandwidth_adds_serialisation_time_per_direction(echo):
    """At 40 Mbit/s 500 KB take ~100 ms to serialise in each direction; an echo pipelines them (the link is full
    duplex, chunks come back while later ones still go up), so it costs ~100 ms beside the round trip, not 0; small
    messages stay at about one RTT."""
    payload = os.urandom(500_000)
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=20, mbit_s=40) as proxy, connect(proxy) as sock:
        t0 = time.perf_counter()
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        got = recv_exact(sock, len(payload))
        elapsed = time.perf_counter() - t0
        sender.join(5)
        small = round_trips(sock, 3)
    assert got == payload
    assert elapsed >= 0.02 + 0.1 * 0.95, elapsed  # the bytes were serialised, not sent at loopback speed
    assert elapsed < 0.02 + 0.2 + SLACK_S, elapsed
    assert min(small) >= 0.02 and max(small) < 0.02 + SLACK_S, small


@pytest.mark.parametrize("mbit", [0, -1, float("nan"), True, "fast"])
def test_bad_bandwidth_is_a_clear_error(mbit):
    with pytest.raises(PocketLMError, match="mbit_s"):
        DelayProxy("127.0.0.1", 9, rtt_ms=10, mbit_s=mbit)


def test_counters_count_chunks_and_reset(echo):
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=20) as proxy:
        with connect(proxy) as sock:
            round_trips(sock, 3, b"abcde")
        assert (proxy.bytes_up, proxy.bytes_down) == (15, 15)
        assert (proxy.messages_up, proxy.messages_down) == (3, 3)
        assert proxy.connections == 1
        proxy.reset_counts()
        assert proxy.counts() == {"bytes_up": 0, "bytes_down": 0, "messages_up": 0, "messages_down": 0,
                                  "connections": 0}
        with connect(proxy) as sock:
            round_trips(sock, 1, b"xyz")
        assert proxy.counts() == {"bytes_up": 3, "bytes_down": 3, "messages_up": 1, "messages_down": 1,
                                  "connections": 1}
        assert wait_for(lambda: proxy.active_connections == 0)


def test_concurrent_connections_are_delayed_independently(echo):
    n = 8
    results: dict[int, list[float]] = {}
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with connect(proxy) as sock:
                results[i] = round_trips(sock, 2, f"client-{i}".encode())
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    with DelayProxy("127.0.0.1", echo.port, rtt_ms=200) as proxy:
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        wall = time.perf_counter() - t0
        assert proxy.connections == n
    assert not errors, errors
    assert len(results) == n
    every = [x for times in results.values() for x in times]
    assert min(every) >= 0.2, every
    assert wall < 2 * 0.2 + SLACK_S + 0.3, wall  # in parallel, not n * 2 round trips one after another


def test_order_is_preserved_and_delays_are_not_coalesced(echo):
    """40 writes 5 ms apart (spanning 200 ms, longer than the 100 ms RTT): the first echo is back one RTT after
    the first send, while later writes are still being sent, and every byte comes back in order."""
    parts = [struct.pack(">I", i) * 4 for i in range(40)]
    received = bytearray()
    first_byte_at: list[float] = []

    with DelayProxy("127.0.0.1", echo.port, rtt_ms=100) as proxy, connect(proxy) as sock:
        def reader():
            while len(received) < 16 * len(parts):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                if not first_byte_at:
                    first_byte_at.append(time.perf_counter())
                received.extend(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        t0 = time.perf_counter()
        for part in parts:
            sock.sendall(part)
            time.sleep(0.005)
        last_send = time.perf_counter()
        thread.join(5)
        done = time.perf_counter()
    assert bytes(received) == b"".join(parts)
    assert first_byte_at and 0.1 <= first_byte_at[0] - t0 < 0.1 + SLACK_S / 2
    assert first_byte_at[0] < last_send  # the first echo did not wait for the later writes
    assert done - last_send < 0.1 + SLACK_S


def test_many_small_writes_stay_in_order(echo):
    parts = [f"{i:05d};".encode() for i in range(3000)]
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=10) as proxy, connect(proxy) as sock:
        sender = threading.Thread(target=lambda: [sock.sendall(p) for p in parts], daemon=True)
        sender.start()
        got = recv_exact(sock, sum(map(len, parts)))
        sender.join(5)
    assert got == b"".join(parts)


def test_half_close_propagates_both_ways(echo):
    """The client shuts its write side: the echo server still answers, then closes; the client reads every byte,
    then EOF."""
    with DelayProxy("127.0.0.1", echo.port, rtt_ms=40) as proxy, connect(proxy) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"last words"
        assert wait_for(lambda: proxy.active_connections == 0)


class _ResetAfterFirstRead(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.recv(1024)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()  # RST


def test_a_target_reset_closes_the_client_side():
    with EchoServer(handler=_ResetAfterFirstRead) as target, \
            DelayProxy("127.0.0.1", target.port, rtt_ms=20) as proxy, connect(proxy) as sock:
        sock.sendall(b"hello")
        t0 = time.perf_counter()
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert time.perf_counter() - t0 < 2.0
        assert wait_for(lambda: proxy.active_connections == 0)


def test_a_client_reset_closes_the_target_side():
    seen = threading.Event()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                while self.request.recv(1024):
                    pass
            except ConnectionResetError:
                pass
            seen.set()

    with EchoServer(handler=Handler) as target, DelayProxy("127.0.0.1", target.port, rtt_ms=20) as proxy:
        sock = connect(proxy)
        sock.sendall(b"hello")
        time.sleep(0.05)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        assert seen.wait(3.0)
        assert wait_for(lambda: proxy.active_connections == 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_target_closes_the_client_and_the_proxy_keeps_serving(caplog):
    port = _free_port()
    with DelayProxy("127.0.0.1", port, rtt_ms=20) as proxy:
        with caplog.at_level(logging.WARNING, logger="pocketlm.serve.wan"), connect(proxy) as sock:
            try:
                assert sock.recv(1024) == b""
            except ConnectionResetError:
                pass
            assert wait_for(lambda: any("cannot reach target" in r.getMessage() for r in caplog.records))
        assert proxy.running
        with EchoServer(port=port), connect(proxy) as sock:  # the target comes up: the same proxy now relays
            assert round_trips(sock, 1) and proxy.connections == 1


def test_stop_closes_open_connections_and_joins_the_thread(echo):
    before = len(proxy_threads())
    proxy = DelayProxy("127.0.0.1", echo.port, rtt_ms=2000).start()
    assert len(proxy_threads()) == before + 1
    idle = connect(proxy)
    busy = connect(proxy)
    busy.sendall(b"x" * 100_000)  # still held in the proxy's delay when stop() comes
    assert wait_for(lambda: proxy.active_connections == 2)
    t0 = time.perf_counter()
    proxy.stop()
    assert time.perf_counter() - t0 < 2.0
    assert len(proxy_threads()) == before and not proxy.running
    for sock in (idle, busy):
        with sock:
            try:
                assert recv_until_eof(sock) == b""
            except ConnectionResetError:
                pass
    proxy.stop()  # idempotent
    with pytest.raises(PocketLMError, match="not running"):
        _ = proxy.port


def test_start_stop_start_again(echo):
    proxy = DelayProxy("127.0.0.1", echo.port, rtt_ms=0)
    for _ in range(2):
        with proxy, connect(proxy) as sock:
            assert round_trips(sock, 1)
    assert not proxy_threads()


@pytest.mark.parametrize("rtt", [-1, -0.001, float("nan"), float("inf"), "100", None, True])
def test_bad_rtt_is_a_clear_error(rtt):
    with pytest.raises(PocketLMError, match="rtt_ms"):
        DelayProxy("127.0.0.1", 9, rtt_ms=rtt)


def test_bad_ports_and_a_taken_listen_port_are_clear_errors(echo):
    with pytest.raises(PocketLMError, match="target_port"):
        DelayProxy("127.0.0.1", 0, rtt_ms=10)
    with pytest.raises(PocketLMError, match="listen_port"):
        DelayProxy("127.0.0.1", echo.port, rtt_ms=10, listen_port=70000)
    with pytest.raises(PocketLMError, match="could not listen"):
        DelayProxy("127.0.0.1", echo.port, rtt_ms=10, listen_port=echo.port).start()
    assert not proxy_threads()


def test_http_keep_alive_requests_cost_one_rtt_each():
    """An OpenAI-compatible server speaks HTTP/1.1 keep-alive: one connection, one RTT per request."""
    from http.client import HTTPConnection
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with DelayProxy("127.0.0.1", server.server_address[1], rtt_ms=100) as proxy:
            conn = HTTPConnection("127.0.0.1", proxy.port, timeout=5)
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = []
            for i in range(3):
                t0 = time.perf_counter()
                conn.request("POST", "/v1/completions", body=f'{{"n": {i}}}'.encode(),
                             headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                assert response.read() == f'{{"n": {i}}}'.encode()
                times.append(time.perf_counter() - t0)
            conn.close()
            assert proxy.connections == 1  # keep-alive: one connection for every request
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert min(times) >= 0.1 and max(times) < 0.1 + SLACK_S, times


def test_websockets_through_the_proxy_cost_one_rtt_per_exchange():
    pytest.importorskip("websockets")
    from websockets.sync.client import connect as ws_connect
    from websockets.sync.server import serve

    def handler(ws):
        for message in ws:
            ws.send(message)

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, name="test-ws-echo", daemon=True)
        thread.start()
        try:
            port = server.socket.getsockname()[1]
            with DelayProxy("127.0.0.1", port, rtt_ms=200) as proxy:
                t0 = time.perf_counter()
                with ws_connect(proxy.ws_url, open_timeout=5, close_timeout=5) as ws:
                    handshake = time.perf_counter() - t0
                    times = []
                    for i in range(3):
                        t1 = time.perf_counter()
                        ws.send(f"message {i}")
                        assert ws.recv(timeout=5) == f"message {i}"
                        times.append(time.perf_counter() - t1)
                    blob = os.urandom(200_000)
                    ws.send(blob)
                    assert ws.recv(timeout=5) == blob
                assert proxy.bytes_up > 200_000 and proxy.bytes_down > 200_000
        finally:
            server.shutdown()
            thread.join(5)
    assert 0.2 <= handshake < 0.2 + SLACK_S, handshake  # the HTTP upgrade is one request/response
    assert min(times) >= 0.2 and max(times) < 0.2 + SLACK_S, times
