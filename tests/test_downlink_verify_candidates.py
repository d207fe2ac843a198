"""Certification asks ride in the verify: with the top-k downlink a speculative verify carries, per drafted
position, the ids the device's delta favours most; the server returns their exact scores with the rows, so fewer
`exact` asks follow, and the tokens stay those of non-speculative decoding. Malformed candidates are refused."""

from __future__ import annotations

import json

import pytest

from pocketlm.steer import SteerEngine, SteerRequest, parse_methods
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteTopK
from pocketlm.steer.cloud.wire import MAX_CANDIDATES, op
from pocketlm.steer.speculative import Speculation
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, raw_connect, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
PROMPT = [256, 1, 72, 105, 33, 258]
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely and I love the sea."
QUERIES = ["Write a haiku.", "Tell me about the sea, please, in some detail.", "Why?"]


def _through_server(serve_pair, candidates: int, ms, reqs):
    cloud, device, tok = serve_pair
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
        rc.verify_candidates = candidates
        engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(3))
        out = engine.generate(reqs, ms, max_new_tokens=24)
        engine.close()
    return out


def test_candidates_save_asks_and_keep_the_tokens(serve_pair):
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form@2,plausible@2,cloud")
    reqs = [SteerRequest.with_context(QUERIES[i % 3], SECRET) for i in range(len(ms))]
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=24)
    without = _through_server(serve_pair, 0, ms, reqs)
    with_ = _through_server(serve_pair, 16, ms, reqs)
    assert [g.token_ids for g in without] == [g.token_ids for g in ref]
    assert [g.token_ids for g in with_] == [g.token_ids for g in ref]
    asked = without.stats.downlink["exact_requests"]
    assert asked > 0  # the setting makes certification ask, so the comparison means something
    assert with_.stats.downlink["exact_requests"] < asked
    assert with_.stats.downlink["uncertified"] == without.stats.downlink["uncertified"] == 0


def test_only_asking_clients_send_candidates(serve_pair):
    """`topk:K:noexact` keeps every candidate id on the device."""
    cloud, _, tok = serve_pair
    with start_server(cloud, tok) as srv:
        with RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2, ask=False) as rc:
            assert rc.verify_candidates == 0
        with RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
            assert rc.verify_candidates > 0


@pytest.mark.parametrize("candidates", [
    [[[1]]],                                  # one position given for a verify of two
    [[[1], [2]], [[3], [4]]],                 # two rows for one
    [[[1], [260]]],                           # an id outside the vocabulary
    [[[1], list(range(MAX_CANDIDATES + 1))]],  # too many at one position
    [[[1], "2"]],                             # not a list of ids
])
def test_malformed_candidates_are_refused(serve_server, candidates):
    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[PROMPT], max_new_tokens=8, format="topk", topk=2, columns=260))
    ws.recv(timeout=10)
    ws.send(op("verify", ids=[[1, 2]], candidates=candidates))
    reply = json.loads(ws.recv(timeout=10))
    assert reply["code"] == 400 and "candidates" in reply["error"]


def test_candidates_come_back_exactly_scored(serve_server, serve_pair):
    """The frame lists each position's candidates with their exact logits (short lists padded past `columns`)."""
    from pocketlm.steer.cloud.wire import decode_scores

    ws, _ = raw_connect(serve_server.url)
    ws.send(op("open", prompts=[PROMPT], max_new_tokens=8, format="f32"))
    ws.recv(timeout=10)
    ws.send(op("verify", ids=[[5, 6]]))
    dense = decode_scores(ws.recv(timeout=10))  # [2, V]: the reference logits
    ws.send(op("close"))
    ws.send(op("open", prompts=[PROMPT], max_new_tokens=8, format="topk", topk=2, columns=260))
    ws.recv(timeout=10)
    ws.send(op("verify", ids=[[5, 6]], candidates=[[[40, 41, 42], [7]]]))
    top = decode_scores(ws.recv(timeout=10))
    for pos, cands in enumerate([[40, 41, 42], [7]]):
        listed = dict(zip(top.ids[pos].tolist(), top.scores[pos].tolist(), strict=True))
        for c in cands:
            assert listed[c] == pytest.approx(float(dense[pos, c]), abs=1e-5)
    assert 260 in top.ids[1].tolist()  # position 1's short list was padded with the id `columns`
