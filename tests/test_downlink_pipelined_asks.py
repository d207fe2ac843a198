"""Certification asks sent while their step is in flight (downlink/pipelined.py): with the top-k downlink and the
overlap on, the device's expected asks go up as soon as its scores exist, on the same connection, and come back
right behind the step's (or the verify's last position's) rows. The tokens stay those of the in-process f32
cloud; fewer asks are left to certification; an unread ask is a clear error, never a silently shifted answer."""

from __future__ import annotations

import pytest
import torch

from pocketlm.steer import SteerEngine, SteerRequest, parse_methods
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteTopK
from pocketlm.steer.cloud.wire import RemoteCloudError
from pocketlm.steer.pipelined import PipelinedAsks
from pocketlm.steer.speculative import Speculation
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely and I love the sea."
QUERIES = ["Write a haiku.", "Tell me about the sea, please, in some detail.", "Why?"]


def _no_asks_ahead(mp) -> None:
    """No ask leaves before certification needs it: none in flight, none behind a verify."""
    init = PipelinedAsks.__init__

    def off(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.on = False
    mp.setattr(PipelinedAsks, "__init__", off)


def _decode(serve_pair, ms, reqs, speculate: int, pipelined: bool, monkeypatch):
    cloud, device, tok = serve_pair
    with monkeypatch.context() as mp:
        if not pipelined:
            _no_asks_ahead(mp)
        with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
            engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(speculate))
            out = engine.generate(reqs, ms, max_new_tokens=20)
            engine.close()
    return out


@pytest.mark.parametrize("speculate", [0, 3])
def test_asks_in_flight_keep_the_tokens_and_save_asks(serve_pair, monkeypatch, speculate):
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form@2,plausible@2,cloud")
    reqs = [SteerRequest.with_context(QUERIES[i % 3], SECRET) for i in range(len(ms))]
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=20)
    without = _decode(serve_pair, ms, reqs, speculate, False, monkeypatch)
    with_ = _decode(serve_pair, ms, reqs, speculate, True, monkeypatch)
    assert [g.token_ids for g in without] == [g.token_ids for g in ref]
    assert [g.token_ids for g in with_] == [g.token_ids for g in ref]
    before, after = without.stats.downlink, with_.stats.downlink
    assert before["ahead_requests"] == 0 and after["ahead_requests"] > 0
    assert before["exact_requests"] > 0  # the setting makes certification ask, so saving asks means something
    assert after["exact_requests"] + after["deepened"] < before["exact_requests"] + before["deepened"]
    assert after["uncertified"] == 0


def test_no_asks_in_flight_without_the_overlap_or_when_sampling(serve_pair):
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form@2")
    reqs = [SteerRequest.with_context(QUERIES[1], SECRET)]
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
        out = SteerEngine(rc, tok, device, tok, overlap=False).generate(reqs, ms, max_new_tokens=8)
    assert out.stats.downlink["ahead_requests"] == 0


def test_an_ask_not_read_is_a_clear_error(serve_pair):
    cloud, _, tok = serve_pair
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
        rc.prefill([[256, 1, 72, 258]])
        mark = rc.sent_count()
        rc.step(torch.tensor([5]))
        assert rc.ask_ahead([[7, 9]], after=mark)
        with pytest.raises(RemoteCloudError, match="not collected"):
            rc.step(torch.tensor([6]))
        got = rc.collect_ahead()
        assert len(got) == 1 and got[0].shape == (2,)
        assert not rc.ask_ahead([[]], after=rc.sent_count() - 1)  # nothing to ask: nothing sent
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2, ask=False) as rc:
        assert not rc.ask_ahead([[7]], after=0)  # topk:K:noexact: no id leaves the device


@pytest.mark.parametrize("speculate", [0, 3])
def test_the_first_tokens_asks_ride_with_the_open(serve_pair, monkeypatch, speculate):
    """The device prefills while the cloud's prefill travels, and the first position's expected asks follow the
    open on the wire: one token per row is then certified with no ask on demand, where without them it asks."""
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form@2,closed_form@3")
    reqs = [SteerRequest.with_context(QUERIES[i], SECRET) for i in range(len(ms))]
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=1)
    outs = {}
    for pipelined in (False, True):
        with monkeypatch.context() as mp:
            if not pipelined:
                _no_asks_ahead(mp)
            with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
                engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(speculate))
                outs[pipelined] = engine.generate(reqs, ms, max_new_tokens=1)
                engine.close()
                assert rc.sent_count() == 1  # the open only: one token needs no step or verify
    for out in outs.values():
        assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert outs[False].stats.downlink["exact_requests"] + outs[False].stats.downlink["deepened"] > 0
    assert outs[True].stats.downlink["ahead_requests"] == 1
    assert outs[True].stats.downlink["exact_requests"] + outs[True].stats.downlink["deepened"] == 0


def test_asks_too_wide_for_the_verify_ride_behind_it(serve_pair, monkeypatch):
    """A drafted position whose expected asks exceed the verify's per-position candidates goes up as an `exact`
    about that position right behind the verify (the frame keeps one width for all positions): the tokens stay the
    in-process f32 cloud's, and fewer asks are left to certification than with the ids squeezed into the frame."""
    cloud, device, tok = serve_pair
    ms = parse_methods("closed_form@2,plausible@2,closed_form@4")
    reqs = [SteerRequest.with_context(QUERIES[i % 3], SECRET) for i in range(len(ms))]
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=20)
    outs = {}
    for behind in (False, True):
        with monkeypatch.context() as mp:
            if not behind:  # the asks can only ride in the frame (an ask too wide is cut to the frame's width)
                mp.setattr("pocketlm.steer.pipelined.MAX_BEHIND", 4)
            with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
                rc.verify_candidates, rc.max_verify_candidates = 1, 4  # a narrow frame
                engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(3))
                outs[behind] = engine.generate(reqs, ms, max_new_tokens=20)
                engine.close()
    for out in outs.values():
        assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    squeezed, riding = outs[False].stats.downlink, outs[True].stats.downlink
    assert riding["ahead_requests"] > squeezed["ahead_requests"]
    assert riding["exact_requests"] + riding["deepened"] < squeezed["exact_requests"] + squeezed["deepened"]
    assert riding["uncertified"] == 0
