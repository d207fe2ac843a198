"""Shared pieces of the step-server tests: a tiny model served on a free loopback port, raw protocol helpers.

Used by tests/test_serve_*.py and the `serve_pair` / `serve_server` fixtures in conftest.py; every server
started there is stopped at the end of its module.
"""

from __future__ import annotations

import copy
import json
import urllib.request

import torch

from pocketlm.models import build_tiny
from pocketlm.serve import Limits, ServerThread, create_app
from pocketlm.steer.cloud.remote import ws_url

TOKEN = "test-token-7f3a"
# uvicorn's WebSocket protocol still uses the websockets library's legacy server (the sans-I/O one cannot send
# a 401 denial); its deprecation notices are not ours
IGNORE_UVICORN_WARNINGS = "ignore::DeprecationWarning:websockets.*"
LIMITS = Limits(slots=80, max_rows=8, max_prompt_tokens=512, max_new_tokens=48, ttl_s=30.0)


def lively(model, seed: int, std: float = 0.2):
    """Re-draw the weight matrices with a larger spread: default tiny models repeat one token forever, which
    would make a token-for-token comparison weak."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def drafting_pair(share: float):
    """(cloud, device, tokenizer): a lively tiny cloud and a device that is `share` the cloud and the rest another
    lively model, so a speculative draft is accepted sometimes (both the accept and the reject path run)."""
    cloud, tok = build_tiny("tiny-llama", seed=2)
    other, _ = build_tiny("tiny-llama", seed=3)
    lively(cloud, 1)
    lively(other, 2)
    device = copy.deepcopy(cloud)
    with torch.no_grad():
        for p, q in zip(device.parameters(), other.parameters(), strict=True):
            p.mul_(share).add_((1 - share) * q)
    return cloud, device, tok


def sent_texts(gen, tok) -> list[str]:
    """What a speculative generation sent up, as texts: its output, and each rejected draft after the output it
    followed (to check that drafts passed the guards before they were sent)."""
    sent = [gen.token_ids] + [gen.token_ids[:start] + ids for start, ids in gen.rejected]
    return [tok.decode(ids, skip_special_tokens=True) for ids in sent]


def tiny_pair():
    """(cloud, device, shared tokenizer). The cloud's EOS row copies (x1.05) the row of a token it often picks,
    so some greedy rows end early and others run to the limit (the tests assert that mix)."""
    cloud, tok = build_tiny("tiny-llama", seed=11)
    device, _ = build_tiny("tiny-llama", seed=12)
    lively(cloud, 1)
    lively(device, 2)
    head = cloud.get_output_embeddings().weight
    with torch.no_grad():
        head[258] = head[207] * 1.05
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
