"""Faults on the device side: a server that stops or restarts mid-generation, a server that accepts the TCP
connection but never answers, one that stops answering after its hello, and no server at all each end in a
`RemoteCloudError` within a bounded time, never a hang."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import torch
from websockets.sync.server import serve

from pocketlm.serve import ServerThread, create_app
from pocketlm.serve.batcher import Batcher, ServeError, Session, Work
from pocketlm.steer.cloud.remote import RemoteCloud
from pocketlm.steer.cloud.wire import PROTOCOL, RemoteCloudError
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import get_method
from serve_fixtures import IGNORE_UVICORN_WARNINGS, LIMITS, TOKEN, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
HELLO = {"server": "pocketlm", "protocol": PROTOCOL, "model": "fake", "vocab_rows": 260, "eos_token_ids": [258],
         "tokenizer": "x", "formats": ["f32"], "limits": {"max_rows": 4, "max_prompt_tokens": 64,
                                                          "max_new_tokens": 8, "ttl_s": 60}}


def test_server_stopping_mid_generation_raises_and_a_restart_serves_again(serve_pair):
    cloud, device, tok = serve_pair
    srv = start_server(cloud, tok)
    port = srv.port
    rc = RemoteCloud(srv.url, TOKEN, tokenizer=tok, timeout=20)
    engine = SteerEngine(rc, tok, device, tok, overlap=True)
    seen = []

    def stop_after_three(_row, tok_id):
        seen.append(tok_id)
        if len(seen) == 3:
            srv.stop()

    t0 = time.monotonic()
    with pytest.raises(RemoteCloudError, match="lost"):
        engine.generate([SteerRequest("Hi.", "ctx\n\nHi.")], [get_method("closed_form")], max_new_tokens=40,
                        on_token=stop_after_three, ignore_eos=True)
    assert time.monotonic() - t0 < 15 and len(seen) == 3
    engine.close()
    restarted = ServerThread(create_app(cloud, tok, token=TOKEN, limits=LIMITS), LIMITS, port=port).start()
    try:
        with pytest.raises(RemoteCloudError, match="lost"):  # the old connection stays dead, clearly
            rc.prefill([[256, 1]])
        with RemoteCloud(restarted.url, TOKEN, tokenizer=tok) as fresh:
            assert fresh.prefill([[256, 1]]).shape == (1, 260)
    finally:
        restarted.stop()


def test_server_that_never_answers_the_handshake():
    listener = socket.create_server(("127.0.0.1", 0))  # accepts (backlog) but never speaks
    try:
        t0 = time.monotonic()
        with pytest.raises(RemoteCloudError, match="cannot reach"):
            RemoteCloud(f"http://127.0.0.1:{listener.getsockname()[1]}", connect_timeout=1.0)
        assert time.monotonic() - t0 < 10
    finally:
        listener.close()


def test_server_that_goes_silent_after_hello():
    def handler(ws):
        ws.send(json.dumps(HELLO))
        for _ in ws:  # read and never answer
            pass

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        rc = RemoteCloud(f"http://127.0.0.1:{port}", timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(RemoteCloudError, match="did not answer within 1 s"):
            rc.step(torch.tensor([1]))
        assert time.monotonic() - t0 < 10
        rc.close()
        server.shutdown()


def test_no_server_and_not_a_step_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteCloudError, match="cannot reach"):
        RemoteCloud(f"http://127.0.0.1:{port}", connect_timeout=2)

    def handler(ws):
        ws.send(json.dumps({"hello": "world"}))

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with pytest.raises(RemoteCloudError, match="protocol"):
            RemoteCloud(f"http://127.0.0.1:{server.socket.getsockname()[1]}")
        server.shutdown()


def test_work_after_the_model_thread_stops_is_refused_not_left_waiting(serve_pair):
    cloud, _, _ = serve_pair
    b = Batcher(cloud, slots=2, max_prompt_tokens=8, max_new_tokens=4)
    b.stop()
    fut = b.submit(Work("open", Session(1), {"prompts": [[1]], "expand": None, "format": "f32", "max_new_tokens": 2}))
    with pytest.raises(ServeError, match="shutting down"):
        fut.result(timeout=5)
    assert not b.alive
