"""The certified top-k downlink: the cloud sends its k best ids, their logits and a bound; the device certifies its
greedy choice or asks for the few ids it cannot rule out, so tokens equal full-vocabulary fusion for every method
(guards included), in process and through the step server, for far fewer bytes. Sampling is exact (full rows
fetched) or truncated to the top-k; a cloud that cannot answer leaves the row uncertified, counted; bad requests
to the server are refused."""

from __future__ import annotations

import pytest
import torch

from pocketlm.errors import PocketLMError
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteCloud, RemoteTopK
from pocketlm.steer.cloud.wire import RemoteCloudError, decode_scores, encode_topk, op, topk_of
from pocketlm.steer.downlink import certify
from pocketlm.steer.downlink.certify import NotCertifiable
from pocketlm.steer.downlink.topk import TopKLogits, TruncatedCloud, truncate
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.guards import build_guards
from pocketlm.steer.fusion.methods import parse_methods
from pocketlm.steer.plan import Sampling
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, raw_connect, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely and I love the sea."
QUERIES = ["Write a haiku.", "Tell me about the sea, please, in some detail.", "Why?"]
METHODS = "cloud,cloud_with_context,device_with_context,costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer"


def requests(n: int) -> list[SteerRequest]:
    return [SteerRequest.with_context(QUERIES[i % len(QUERIES)], SECRET) for i in range(n)]


def decode(cloud_backend, serve_pair, methods=METHODS, *, sampling=None, tokens=20, guards=None):
    _, device, tok = serve_pair
    ms = parse_methods(methods)
    if guards:
        ms = [m.with_guards(*build_guards(**guards)) for m in ms]
    engine = SteerEngine(cloud_backend, tok, device, tok)
    gens = engine.generate(requests(len(ms)), ms, max_new_tokens=tokens, sampling=sampling)
    return gens, engine


def test_truncate_and_dense_fill_unknown_ids_with_the_bound():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    top = truncate(logits, 2)
    assert top.ids.tolist() == [[1, 3], [0, 1]] and top.bound.tolist() == [1.0, 3.0]
    assert torch.allclose(top.lse, torch.logsumexp(logits, -1))
    filled, known = top.dense(5)
    assert known.tolist() == [[False, True, False, True, False], [True, True, False, False, False]]
    assert torch.allclose(filled[known], torch.log_softmax(logits, -1)[known])
    assert torch.allclose(filled[0, ~known[0]], top.bound[0] - top.lse[0])
    narrow, nk = top.dense(1)  # ids past the fused width are dropped, never written into column 0
    assert nk.tolist() == [[False], [True]] and narrow[0, 0] == top.bound[0] - top.lse[0]
    with pytest.raises(PocketLMError, match="top-k"):
        truncate(logits, 5)
    with pytest.raises(PocketLMError, match="malformed"):
        TopKLogits(top.ids, top.scores[:, :1], top.bound, top.lse)


@pytest.mark.parametrize(("k", "ask_limit"), [(1, 128), (8, 128), (1, 0)])
def test_greedy_tokens_equal_full_vocabulary_fusion_for_every_method(serve_pair, k, ask_limit, monkeypatch):
    """ask_limit 0: every row the top-k cannot certify is first deepened (the cloud's next-ranked ids)."""
    monkeypatch.setattr(certify, "ASK_LIMIT", ask_limit)
    cloud, _, tok = serve_pair
    ref, _ = decode(HFCloudBackend(cloud, tok), serve_pair)
    out, engine = decode(TruncatedCloud(HFCloudBackend(cloud, tok), k), serve_pair)
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert [g.finish for g in out] == [g.finish for g in ref]
    stats = out.stats.downlink
    assert stats["rows"] > 0 and stats["uncertified"] == 0
    assert stats["exact_requests"] > 0  # a tiny random model is flat: the top-k alone is often not enough
    assert stats["deepened"] > 0 or ask_limit > 0


def test_guarded_methods_equal_full_vocabulary_fusion(serve_pair):
    """Guards refuse winners (the tiny model repeats itself); each re-choice is certified again."""
    cloud, _, tok = serve_pair
    methods, guards = "closed_form,plausible,cloud_with_context,cloud", {"max_copy": 1, "no_repeat_ngram": 1}
    ref, _ = decode(HFCloudBackend(cloud, tok), serve_pair, methods, guards=guards)
    out, _ = decode(TruncatedCloud(HFCloudBackend(cloud, tok), 2), serve_pair, methods, guards=guards)
    assert sum(g.guard_rejections for g in ref) > 0
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]


def test_sampling_exact_fetches_full_rows_and_truncated_stays_in_the_top_k(serve_pair):
    cloud, _, tok = serve_pair
    exact = Sampling(temperature=1.0, seed=3, downlink="exact")
    ref, _ = decode(HFCloudBackend(cloud, tok), serve_pair, "closed_form,plausible", sampling=exact)
    out, engine = decode(TruncatedCloud(HFCloudBackend(cloud, tok), 4), serve_pair, "closed_form,plausible",
                         sampling=exact)
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert out.stats.downlink["full_rows"] == out.stats.downlink["rows"]
    greedy, _ = decode(HFCloudBackend(cloud, tok), serve_pair, "cloud")
    one, _ = decode(TruncatedCloud(HFCloudBackend(cloud, tok), 1), serve_pair, "cloud",
                    sampling=Sampling(temperature=1.0, seed=3, downlink="truncated"))
    assert one[0].token_ids == greedy[0].token_ids  # sampling within the top-1 is the greedy choice
    with pytest.raises(PocketLMError, match="downlink"):
        Sampling(temperature=1.0, downlink="approximate")


class Deaf(TruncatedCloud):
    """A truncated cloud that cannot answer for ids outside its top-k (as a text-only server may not)."""

    def exact(self, rows, ids):
        raise NotCertifiable("no exact scores here")

    def more(self, rows, depth):
        raise NotCertifiable("no deeper ranking here")

    def full(self, rows):
        raise NotCertifiable("no full rows here")


class Vague(Deaf):
    """Answers, but cannot name the ids it is asked for (NaN: e.g. a text server's unnamed special tokens)."""

    def exact(self, rows, ids):
        return [torch.full((len(i),), float("nan")) for i in ids]


@pytest.mark.parametrize("kind", [Deaf, Vague])
def test_a_cloud_that_cannot_answer_leaves_rows_uncertified_and_picks_a_known_token(serve_pair, kind):
    cloud, _, tok = serve_pair
    backend = kind(HFCloudBackend(cloud, tok), 3)
    seen: list[set[int]] = []
    step = backend.step

    def record(ids):
        top = step(ids)
        seen.append(set(top.ids[0].tolist()))
        return top
    backend.step = record
    out, engine = decode(backend, serve_pair, "closed_form", tokens=12)
    assert out.stats.downlink["uncertified"] > 0
    assert (out.stats.downlink["excluded_ids"] > 0) == (kind is Vague)
    assert all(t in s for t, s in zip(out[0].token_ids[1:], seen, strict=False))


def test_topk_downlink_refuses_an_intersection_vocabulary(serve_pair):
    cloud, device, tok = serve_pair
    with pytest.raises(PocketLMError, match="shared vocabulary"):
        SteerEngine(TruncatedCloud(HFCloudBackend(cloud, tok), 4), tok, device, tok, vocab="intersection")


def test_step_server_topk_equals_full_f32_with_fewer_bytes(serve_pair, monkeypatch):
    monkeypatch.setattr(certify, "ASK_LIMIT", 4)  # so the server's `more` runs too
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form,plausible,ada_costeer,cloud")
    reqs = requests(len(ms))
    with start_server(cloud, tok) as srv:
        with RemoteCloud(srv.url, TOKEN, tokenizer=tok) as full:
            ref = SteerEngine(full, tok, device, tok).generate(reqs, ms, max_new_tokens=20)
            full_down = full.bytes_down
        with RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=16) as rc:
            # without the overlap no ask is sent ahead (those cover every position of this tiny pair, test_downlink_
            # pipelined_asks.py), so certification asks on demand and deepens
            engine = SteerEngine(rc, tok, device, tok, overlap=False)
            out = engine.generate(reqs, ms, max_new_tokens=20)
            engine.close()
            assert rc.columns == engine.align.size
            assert out.stats.downlink["deepened"] > 0
            top_down = rc.bytes_down
        with RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2, ask=False) as quiet:  # candidate ids never go up
            engine = SteerEngine(quiet, tok, device, tok)
            quiet_out = engine.generate(reqs, ms, max_new_tokens=20)
            assert quiet_out.stats.downlink["uncertified"] > 0 and quiet_out.stats.downlink["exact_requests"] == 0
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert top_down < full_down


def test_topk_format_names():
    assert topk_of("topk") == (64, True) and topk_of("topk:8") == (8, True)
    assert topk_of("topk:8:noexact") == (8, False)
    for bad in ("topk:x", "topk:8:maybe", "top", "topk:8:noexact:1"):
        with pytest.raises(RemoteCloudError, match="unknown score format"):
            topk_of(bad)


def test_topk_frame_round_trips():
    top = truncate(torch.randn(3, 50), 7)
    back = decode_scores(encode_topk(top))
    for a, b in zip((back.ids, back.scores, back.bound, back.lse), (top.ids, top.scores, top.bound, top.lse), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(RemoteCloudError, match="top-k frame"):
        decode_scores(encode_topk(top)[:-4])


def test_server_refuses_bad_topk_requests(serve_server):
    ws, hello = raw_connect(serve_server.url)
    try:
        assert "topk" in hello["formats"]

        def refused(msg, code):
            ws.send(msg)
            reply = ws.recv(timeout=10)
            assert isinstance(reply, str) and str(code) in reply, reply

        refused(op("exact", rows=[0], ids=[[1]]), 404)  # nothing open
    finally:
        ws.close()
    for bad in (op("open", prompts=[[1, 2]], format="topk", topk=0, columns=100),
                op("open", prompts=[[1, 2]], format="topk", topk=5, columns=10**9),
                op("exact", rows=[0], ids=[1]), op("full", rows=[])):
        ws, _ = raw_connect(serve_server.url)
        try:
            ws.send(bad)
            assert "400" in ws.recv(timeout=10)
        finally:
            ws.close()
    ws, _ = raw_connect(serve_server.url)
    try:
        ws.send(op("open", prompts=[[1, 2, 3]], format="topk", topk=4, columns=100))
        top = decode_scores(ws.recv(timeout=10))
        assert isinstance(top, TopKLogits) and top.ids.shape == (1, 4) and int(top.ids.max()) < 100
        ws.send(op("exact", rows=[0], ids=[[int(top.ids[0, 0]), 5]]))
        got = decode_scores(ws.recv(timeout=10))
        assert got.shape == (1, 2) and torch.isclose(got[0, 0], top.scores[0, 0])
        ws.send(op("more", rows=[0], depth=10))
        deeper = decode_scores(ws.recv(timeout=10))
        assert deeper.ids.shape == (1, 10) and deeper.ids[0, :4].tolist() == top.ids[0].tolist()
        assert float(deeper.bound[0]) <= float(top.bound[0])
        ws.send(op("exact", rows=[3], ids=[[5]]))
        assert "400" in ws.recv(timeout=10)
    finally:
        ws.close()
