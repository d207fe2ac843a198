"""Step-server protocol: hello, auth, every refused input (clear 4xx, then the socket closes), /health, /metrics,
and the batched KV-pool step equal to the model's own forward for rows of different lengths."""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch
from websockets.exceptions import ConnectionClosed

from pocketlm.serve.pool import KVPool
from pocketlm.steer.cloud.remote import RemoteCloud
from pocketlm.steer.cloud.wire import RemoteCloudError, decode_scores, op, tokenizer_fingerprint
from serve_fixtures import IGNORE_UVICORN_WARNINGS, LIMITS, TOKEN, metric, raw_connect

PROMPT = [256, 1, 72, 105, 33, 258]
pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)


def refused(ws, *messages) -> tuple[int, int]:
    """Send messages, return (error code in the JSON reply, WebSocket close code)."""
    for m in messages:
        ws.send(m)
    err = json.loads(ws.recv(timeout=10))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    return err["code"], closed.value.rcvd.code


def test_hello_names_model_vocab_tokenizer_and_limits(serve_server, serve_pair):
    _, _, tok = serve_pair
    ws, hello = raw_connect(serve_server.url)
    ws.close()
    assert hello["vocab_rows"] == 260 and hello["eos_token_ids"] == [258]
    assert hello["tokenizer"] == tokenizer_fingerprint(tok)
    assert hello["limits"]["max_prompt_tokens"] == LIMITS.max_prompt_tokens and "f32" in hello["formats"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_missing_or_wrong_token_is_401(serve_server, token):
    with pytest.raises(RemoteCloudError, match="HTTP 401"):
        RemoteCloud(serve_server.url, token)


def test_open_step_close_roundtrip_and_formats(serve_server):
    ws, _ = raw_connect(serve_server.url)
    for fmt, tol in (("f32", 0.0), ("f16", 1e-2), ("bf16", 6e-2)):
        ws.send(op("open", prompts=[PROMPT], expand=[0, 0], max_new_tokens=4, format=fmt))
        first = decode_scores(ws.recv(timeout=10))
        assert first.shape == (2, 260) and torch.equal(first[0], first[1])
        ws.send(op("step", ids=[65, 66]))
        nxt = decode_scores(ws.recv(timeout=10))
        ws.send(op("close"))
        if fmt == "f32":
            ref = nxt
        else:
            assert (nxt - ref).abs().max() <= tol * ref.abs().max()
    ws.close()


@pytest.mark.parametrize("message, code", [
    ("not json", 400),
    (op("launch"), 400),
    (op("step", ids=[1]), 404),                                               # no open session
    (op("keep", rows=[0]), 404),
    (op("open", prompts=[[1, 260]]), 400),                                     # out-of-vocabulary id
    (op("open", prompts=[[1, -1]]), 400),
    (op("open", prompts=[[1, 2.5]]), 400),
    (op("open", prompts=[[]]), 413),
    (op("open", prompts=[[1] * (LIMITS.max_prompt_tokens + 1)]), 413),        # prompt over the limit
    (op("open", prompts=[[1]] * (LIMITS.max_rows + 1)), 400),                  # too many rows
    (op("open", prompts=[[1]], expand=[1]), 400),                              # expand names no prompt
    (op("open", prompts=[[1]], format="f8"), 400),
    (op("open", prompts=[[1]], max_new_tokens=LIMITS.max_new_tokens + 1), 400),
    (json.dumps({"op": "open", "prompts": "hello"}), 400),
])
def test_bad_first_message_refused(serve_server, message, code):
    ws, _ = raw_connect(serve_server.url)
    assert refused(ws, message) == (code, 4000 + code)


@pytest.mark.parametrize("after_open, code", [
    (op("step", ids=[1, 2]), 400),            # 2 ids for 1 row
    (op("step", ids=[260]), 400),             # out-of-vocabulary chosen id
    (op("keep", rows=[1]), 400),              # no such row
    (op("keep", rows=[0, 0]), 400),           # not strictly increasing
    (op("open", prompts=[[1]]), 409),         # second open without close
])
def test_bad_message_in_session_refused(serve_server, after_open, code):
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[PROMPT], max_new_tokens=4))
    ws.recv(timeout=10)
    ws.send(after_open)
    if after_open.startswith('{"op":"keep"'):  # keep has no reply: its error answers the next step
        try:
            ws.send(op("step", ids=[1]))
        except ConnectionClosed:  # a malformed keep is refused at once: the server may have closed already
            pass
    reply = json.loads(ws.recv(timeout=10))
    assert reply["code"] == code


def test_binary_uplink_and_step_budget_refused(serve_server):
    ws, _ = raw_connect(serve_server.url)
    assert refused(ws, b"\x00\x01") == (400, 4400)
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[PROMPT], max_new_tokens=2))
    ws.recv(timeout=10)
    for _ in range(2):
        ws.send(op("step", ids=[65]))
        ws.recv(timeout=10)
    assert refused(ws, op("step", ids=[65])) == (400, 4400)


def test_oversize_message_closes_with_1009(serve_server):
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[[1] * (LIMITS.max_message_bytes() // 2)]))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1009


def test_health_and_metrics(serve_server):
    with urllib.request.urlopen(serve_server.url + "/health", timeout=10) as r:
        health = json.loads(r.read())
    assert health["status"] == "ok" and health["free_rows"] <= LIMITS.slots
    before = metric(serve_server.url, "pocketlm_tokens_total")
    c = RemoteCloud(serve_server.url, TOKEN)
    c.reserve(3)
    c.prefill([PROMPT])
    c.step(torch.tensor([65]))
    c.release()
    c.close()
    assert metric(serve_server.url, "pocketlm_tokens_total") == before + 1
    with urllib.request.urlopen(serve_server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'pocketlm_batch_rows_bucket{le="+Inf"}' in text and 'pocketlm_refused_total{code="401"}' in text


def test_pool_step_equals_full_forward_for_rows_of_different_lengths(serve_pair):
    """Three rows at different lengths in one batched step, slots reused after a give-back."""
    cloud, _, _ = serve_pair
    pool = KVPool(cloud, slots=4, capacity=64)
    prompts = [[256, 5, 6, 7, 8, 9, 10], [256, 40], [256, 1, 2, 3]]
    waste = pool.take(1)
    pool.prefill([256, 9, 9], waste)
    pool.give_back(waste)
    slots = [pool.take(1)[0] for _ in prompts]
    for p, s in zip(prompts, slots, strict=True):
        pool.prefill(p, [s])
    seqs = [list(p) for p in prompts]
    for t in range(3):
        ids = [30 + t, 31 + t, 32 + t]
        got = pool.step(slots, ids)
        for row, (seq, i) in enumerate(zip(seqs, ids, strict=True)):
            seq.append(i)
            with torch.no_grad():
                want = cloud(torch.tensor([seq])).logits[0, -1].float()
            assert torch.allclose(got[row], want, atol=1e-4), (t, row)
