"""Load: 64 concurrent sessions x 32 tokens with zero errors, batched together and each decoding exactly what it
decodes alone; 1,000 sessions opened and closed leave memory flat and every KV row free; a client that goes
silent mid-session has its rows freed by the idle TTL."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pocketlm.serve import Limits
from pocketlm.steer.cloud.remote import ws_url
from pocketlm.steer.cloud.wire import decode_scores, op
from serve_fixtures import IGNORE_UVICORN_WARNINGS, LIMITS, TOKEN, metric, raw_connect, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def greedy_session(url: str, prompt: list[int], tokens: int) -> list[int]:
    """Open, then step with the argmax `tokens - 1` times; the chosen ids."""
    async with connect(ws_url(url), additional_headers=AUTH, compression=None, proxy=None, open_timeout=30) as ws:
        json.loads(await ws.recv())
        await ws.send(op("open", prompts=[prompt], max_new_tokens=tokens))
        chosen = []
        for i in range(tokens):
            scores = decode_scores(await asyncio.wait_for(ws.recv(), 60))
            assert scores.shape == (1, 260)
            chosen.append(int(np.argmax(scores.numpy()[0])))
            if i < tokens - 1:
                await ws.send(op("step", ids=chosen[-1:]))
        await ws.send(op("close"))
        return chosen


async def open_close_cycles(url: str, cycles: int) -> None:
    async with connect(ws_url(url), additional_headers=AUTH, compression=None, proxy=None, open_timeout=30) as ws:
        await ws.recv()
        for c in range(cycles):
            await ws.send(op("open", prompts=[[256, 1 + c % 200, 2]], expand=[0, 0], max_new_tokens=2))
            await ws.recv()
            await ws.send(op("step", ids=[5, 6]))
            await ws.recv()
            await ws.send(op("close"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_64_concurrent_sessions_x_32_tokens(serve_server):
    prompts = [[256, 1, 10 + i % 50, 20 + i // 50, 258] for i in range(64)]
    forwards0, rows0 = (metric(serve_server.url, f"pocketlm_batch_rows_{k}") for k in ("count", "sum"))

    async def run_all():
        return await asyncio.gather(*(greedy_session(serve_server.url, p, 32) for p in prompts))

    results = asyncio.run(run_all())
    assert len(results) == 64 and all(len(r) == 32 for r in results)
    forwards = metric(serve_server.url, "pocketlm_batch_rows_count") - forwards0
    rows = metric(serve_server.url, "pocketlm_batch_rows_sum") - rows0
    assert rows == 64 * 31 and forwards < rows  # steps of different sessions shared forwards
    for i in (0, 17, 63):  # batching changed nothing: the same session alone decodes the same ids
        assert asyncio.run(greedy_session(serve_server.url, prompts[i], 32)) == results[i]


def test_1000_sessions_leave_memory_flat(serve_server):
    asyncio.run(open_close_cycles(serve_server.url, 100))  # warm-up: allocator pools, first-use caches
    before = rss_bytes()

    async def many():
        await asyncio.gather(*(open_close_cycles(serve_server.url, 100) for _ in range(10)))

    asyncio.run(many())
    deadline = time.monotonic() + 10  # a client's last `close` needs no answer: the server may still be on it
    while True:
        with urllib.request.urlopen(serve_server.url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        if health["sessions"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert health["sessions"] == 0 and health["free_rows"] == LIMITS.slots
    assert rss_bytes() - before < 32 * 2**20


def test_dropped_connection_frees_the_rows_of_its_latest_session(serve_server):
    """A second session opened on the same connection (after a close) is freed when the client vanishes."""
    rows0 = metric(serve_server.url, "pocketlm_kv_rows")
    ws, _ = raw_connect(serve_server.url)
    for expand in ([0], [0, 0, 0]):
        ws.send(op("open", prompts=[[256, 1, 2]], expand=expand, max_new_tokens=4))
        ws.recv(timeout=10)
        if len(expand) == 1:
            ws.send(op("close"))
    assert metric(serve_server.url, "pocketlm_kv_rows") == rows0 + 3
    ws.close()
    deadline = time.monotonic() + 10
    while metric(serve_server.url, "pocketlm_kv_rows") != rows0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(serve_server.url, "pocketlm_kv_rows") == rows0


def test_silent_client_is_freed_by_the_ttl(serve_pair):
    cloud, _, tok = serve_pair
    srv = start_server(cloud, tok, limits=Limits(slots=8, max_rows=4, max_prompt_tokens=64, max_new_tokens=8,
                                                 ttl_s=0.5))
    try:
        ws, _ = raw_connect(srv.url)
        ws.send(op("open", prompts=[[256, 1, 2]], expand=[0, 0, 0], max_new_tokens=4))
        ws.recv(timeout=10)
        assert metric(srv.url, "pocketlm_kv_rows") == 3
        deadline = time.monotonic() + 10
        while metric(srv.url, "pocketlm_kv_rows") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(srv.url, "pocketlm_kv_rows") == 0 and metric(srv.url, "pocketlm_sessions") == 0
        assert json.loads(ws.recv(timeout=5))["code"] == 408
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd.code == 4408
    finally:
        srv.stop()
