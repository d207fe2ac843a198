"""Shared pieces of the step-server tests: a tiny model served on a free loopback port, raw protocol helpers.

Used by tests/test_serve_*.py and the `serve_pair` / `serve_server` fixtures in conftest.py; every server
started there is stopped at the end of its module.
"""

from __future__ import annotations

import json
import urllib.request

from pocketlm.models import build_tiny
from pocketlm.serve import Limits, ServerThread, create_app
from pocketlm.steer.remote import ws_url

TOKEN = "test-token-7f3a"
# uvicorn's WebSocket protocol still uses the websockets library's legacy server (the sans-I/O one cannot send
# a 401 denial); its deprecation notices are not ours
IGNORE_UVICORN_WARNINGS = "ignore::DeprecationWarning:websockets.*"
LIMITS = Limits(slots=80, max_rows=8, max_prompt_tokens=512, max_new_tokens=48, ttl_s=30.0)


def tiny_pair():
    """(cloud model, device model, shared tokenizer): the same pair the in-process comparisons use."""
    cloud, tok = build_tiny("tiny-llama", seed=11, hidden=64, layers=2)
    device, _ = build_tiny("tiny-llama", seed=12, hidden=64, layers=2)
    return cloud, device, tok


def start_server(cloud, tok, *, token: str | None = TOKEN, limits: Limits = LIMITS) -> ServerThread:
    return ServerThread(create_app(cloud, tok, name="tiny-llama", token=token, limits=limits), limits).start()


def raw_connect(url: str, token: str | None = TOKEN, **kw):
    """A bare protocol connection (no client-side checks), hello already read."""
    from websockets.sync.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else None
    ws = connect(ws_url(url), additional_headers=headers, compression=None, proxy=None, open_timeout=10, legacy=True, **kw)
    hello = json.loads(ws.recv(timeout=10))
    return ws, hello


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise KeyError(name)
