"""Privacy audit: every byte the device sends to the step server, recorded by a TCP proxy between them, holds only
session operations and token ids of the public query; the private context (text, distinctive substrings, and its
token ids) never appears. A control run with the non-private `cloud_with_context` method shows the audit catches
a leak."""

from __future__ import annotations

import json
import logging
import socket
import threading

import pytest

from pocketlm.steer.cloud.remote import RemoteCloud, RemoteTopK
from pocketlm.steer.cloud.wire import op
from pocketlm.steer.engine import SteerEngine, SteerRequest, chat_ids
from pocketlm.steer.fusion.methods import parse_methods
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, raw_connect

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
SECRET = "My passphrase is XYZZY-PLUGH-7731; I live at 42 Quiet Lane, Tromso, and my doctor is Dr. Vell."
DISTINCTIVE = ["XYZZY", "PLUGH", "7731", "Quiet Lane", "Tromso", "Dr. Vell", "passphrase"]
QUERIES = ["Write a short note to a friend.", "Plan my weekend."]
FIELDS = {"open": {"op", "prompts", "expand", "max_new_tokens", "format"}, "step": {"op", "ids"},
          "keep": {"op", "rows"}, "close": {"op"}, "exact": {"op", "rows", "ids"}, "full": {"op", "rows"},
          "more": {"op", "rows", "depth"}, "verify": {"op", "ids"}, "rewind": {"op", "drop"}}
AT = {"position"}  # exact / more / full about a verified position
TOPK_OPEN = FIELDS["open"] | {"topk", "columns"}
HEADERS = {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "authorization"}


class RecordingProxy:
    """Loopback TCP proxy: forwards both ways, keeps every byte the client sends upstream."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up: list[bytearray] = []  # one buffer per client connection
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            buf = bytearray()
            self.up.append(buf)
            self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, buf), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        try:
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for s in self._socks:
            s.close()


def client_frames(stream: bytes) -> tuple[dict[str, str], list[tuple[int, bytes]]]:
    """The HTTP upgrade request's headers and the client's WebSocket frames (opcode, unmasked payload)."""
    head, _, rest = stream.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    frames, i = [], 0
    while i < len(rest):
        b0, b1 = rest[i], rest[i + 1]
        assert b0 & 0x70 == 0, "no extension (compression) may be in use"
        assert b1 & 0x80, "client frames are masked"
        n, i = b1 & 0x7F, i + 2
        if n == 126:
            n, i = int.from_bytes(rest[i:i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(rest[i:i + 8], "big"), i + 8
        mask, i = rest[i:i + 4], i + 4
        frames.append((b0 & 0x0F, bytes(c ^ mask[j % 4] for j, c in enumerate(rest[i:i + n]))))
        i += n
    return headers, frames


def contains(seq: list[int], gram: list[int]) -> bool:
    return any(seq[i:i + len(gram)] == gram for i in range(len(seq) - len(gram) + 1))


def audit(stream: bytes, tok) -> tuple[list[dict], bool]:
    """Check one connection's uplink; returns its messages and whether any 6 consecutive ids of the secret
    appear in any id list sent."""
    for text in [SECRET, *DISTINCTIVE]:
        for enc in (text.encode(), text.encode("utf-16-le"), json.dumps(text).encode()):
            assert enc not in stream
    headers, frames = client_frames(stream)
    assert {h.lower() for h in headers} <= HEADERS, headers
    messages = []
    for opcode, payload in frames:
        if opcode in (0x8, 0x9, 0xA):  # close / ping / pong: control frames
            continue
        assert opcode == 0x1, "only JSON text goes up"
        msg = json.loads(payload)
        allowed = (FIELDS[msg["op"]], TOPK_OPEN if msg["op"] == "open" else None, FIELDS[msg["op"]] | AT,
                   FIELDS["verify"] | {"candidates"} if msg["op"] == "verify" else None)
        assert set(msg) in allowed, msg.keys()
        ids = msg.get("ids", [])
        ids = [i for row in ids for i in row] if msg["op"] in ("exact", "verify") else ids
        ids = ids + [i for row in msg.get("candidates", []) for c in row for i in c]
        id_lists = msg.get("prompts", []) + [ids, msg.get("rows", []), msg.get("expand") or [], msg.get("drop", [])]
        assert all(type(v) is int for ids in id_lists for v in ids)
        messages.append(msg)
    secret_ids = tok(SECRET, add_special_tokens=False)["input_ids"]
    sent = [m["prompts"] for m in messages if m["op"] == "open"]
    asked = [i for m in messages if m["op"] == "exact" for row in m["ids"] for i in row]  # top-k candidates
    asked += [i for m in messages if m["op"] == "verify" for row in m.get("candidates", []) for c in row for i in c]
    drafts = [row for m in messages if m["op"] == "verify" for row in m["ids"]]  # chosen id + draft, per row
    seqs = [p for ps in sent for p in ps] + [[i for m in messages if m["op"] == "step" for i in m["ids"]], asked]
    seqs += drafts
    leak = any(contains(s, secret_ids[k:k + 6]) for s in seqs for k in range(len(secret_ids) - 5))
    return messages, leak


@pytest.fixture
def proxy(serve_server):
    p = RecordingProxy(serve_server.port)
    yield p
    p.close()


def generate_through(proxy, serve_pair, methods: str, client=RemoteCloud, speculate=0, **kw):
    _, device, tok = serve_pair
    reqs = [SteerRequest(q, f"{SECRET}\n\n{q}") for q in QUERIES]
    ms = parse_methods(methods)
    with client(proxy.url, TOKEN, tokenizer=tok, **kw) as rc:
        engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=speculate)
        gens = engine.generate(reqs * (len(ms) // 2), ms, max_new_tokens=16)
        engine.close()
    return gens


def test_uplink_holds_only_operations_and_public_token_ids(proxy, serve_pair):
    _, _, tok = serve_pair
    gens = generate_through(proxy, serve_pair, "closed_form,costeer,ada_costeer,adaptive")
    assert all(g.token_ids for g in gens)
    (stream,) = proxy.up
    messages, leak = audit(bytes(stream), tok)
    assert not leak
    opens = [m for m in messages if m["op"] == "open"]
    assert len(opens) == 1 and {tuple(p) for p in opens[0]["prompts"]} == {tuple(chat_ids(tok, q)) for q in QUERIES}
    assert [m["op"] for m in messages][-1] == "close" and sum(m["op"] == "step" for m in messages) >= 15


def test_topk_uplink_holds_only_operations_and_token_ids(proxy, serve_pair):
    """The top-k downlink adds `exact` requests: they carry row indices and candidate ids (a side channel the
    docs name: which tokens the device's delta favours), never the context's text or its id sequence."""
    _, _, tok = serve_pair
    gens = generate_through(proxy, serve_pair, "closed_form,plausible", client=RemoteTopK, k=2)
    assert all(g.token_ids for g in gens)
    (stream,) = proxy.up
    messages, leak = audit(bytes(stream), tok)
    assert not leak
    assert any(m["op"] == "exact" for m in messages)  # the audit saw the extra requests


def test_speculative_uplink_holds_only_operations_and_token_ids(proxy, serve_pair):
    """`verify` carries the chosen id and the device's draft per row, `rewind` counts: ids and numbers only,
    and no run of the context's ids (drafts pass the same checks as every id sent)."""
    _, _, tok = serve_pair
    gens = generate_through(proxy, serve_pair, "closed_form,ada_costeer", client=RemoteTopK, k=4, speculate=3)
    assert all(g.token_ids for g in gens) and sum(g.drafted_tokens for g in gens) > 0
    (stream,) = proxy.up
    messages, leak = audit(bytes(stream), tok)
    assert not leak
    ops = {m["op"] for m in messages}
    assert {"verify", "rewind"} <= ops


def test_audit_catches_the_non_private_method(proxy, serve_pair):
    """Control: `cloud_with_context` sends the context to the cloud by design; the audit must see it."""
    _, _, tok = serve_pair
    generate_through(proxy, serve_pair, "cloud_with_context,closed_form")
    (stream,) = proxy.up
    _, leak = audit(bytes(stream), tok)  # no text match: the context goes up as ids, hence the id n-gram check
    assert leak


def test_server_logs_hold_no_payload(serve_server, serve_pair, caplog):
    """Debug logging on, a session plus refused messages carrying markers: no marker reaches a server log line."""
    _, _, tok = serve_pair
    caplog.set_level(logging.DEBUG)
    marked = [256, 201, 202, 203, 204, 205, 206, 207]
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[marked], max_new_tokens=4))
    ws.recv(timeout=10)
    ws.send(op("step", ids=[259]))
    ws.recv(timeout=10)
    ws.send("XYZZY not json")
    ws.recv(timeout=10)
    ws.close()
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[[1, 99999]]))
    ws.recv(timeout=10)
    ws.close()
    # the test's own client logs its frames at debug level; the server's loggers are pocketlm.*, uvicorn.*
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith("websockets.client"))
    assert "refused" in text  # the refusals were logged, by code
    for marker in ("XYZZY", "201, 202", "201,202", "259", "99999"):
        assert marker not in text
