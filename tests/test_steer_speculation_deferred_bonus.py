"""A verify's bonus position decided a round later (steer/deferred.py): with the top-k downlink, one live row and
a server that keeps `last` after a rewind, a last position the device expects to need asks is left undecided, its
token drafted from the real cloud row and its asks sent right behind the next verify. The tokens stay those of
the in-process f32 cloud, with and without drafting ahead and guards; an old server gets no deferral."""

from __future__ import annotations

import pytest
import torch

from pocketlm.steer import SteerEngine, SteerRequest, parse_methods
from pocketlm.steer.cloud import wire
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteTopK
from pocketlm.steer.fusion.guards import build_guards
from pocketlm.steer.speculative import Speculation
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, start_server

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
SECRET = "I am Ann Quist, a baker on Mill Road; I write tersely and I love the sea."
QUERIES = ["Write a haiku.", "Tell me about the sea, please, in some detail.", "Why?", "Name three colours."]


def _methods(guarded: bool):
    ms = parse_methods("closed_form@2,plausible@2,closed_form@4")
    return [m.with_guards(*build_guards(max_copy=3, protect=["harbour"])) for m in ms] if guarded else ms


def _run(serve_pair, ms, spec: Speculation, defers: bool, monkeypatch):
    """Each (query, method) alone (one live row), through the step server's top-k; (generations, totals)."""
    cloud, device, tok = serve_pair
    gens, totals = [], {"deferred": 0, "deferred_hits": 0, "uncertified": 0, "rounds": 0}
    with monkeypatch.context() as mp:
        if not defers:  # as with a server whose hello lacks `last_after_rewind`
            mp.setattr(wire, "LAST_AFTER_REWIND", "a feature this server does not announce")
        with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
            assert rc.defers_bonus is defers
            engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=spec)
            for q in QUERIES:
                for m in ms:
                    out = engine.generate([SteerRequest.with_context(q, SECRET)], [m], max_new_tokens=24)
                    gens.append(out[0].token_ids)
                    for key in ("deferred", "deferred_hits", "rounds"):
                        totals[key] += out.stats.speculation[key]
                    totals["uncertified"] += out.stats.downlink["uncertified"]
            engine.close()
    return gens, totals


@pytest.mark.parametrize("ahead,guarded", [(False, False), (True, False), (False, True)])
def test_a_deferred_bonus_keeps_the_tokens(serve_pair, monkeypatch, ahead, guarded):
    cloud, device, tok = serve_pair
    ms = _methods(guarded)
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok)
    want = [ref.generate([SteerRequest.with_context(q, SECRET)], [m], max_new_tokens=24)[0].token_ids
            for q in QUERIES for m in ms]
    got, totals = _run(serve_pair, ms, Speculation(3, ahead=ahead), True, monkeypatch)
    assert got == want
    assert totals["deferred"] > 0  # the setting leaves bonus positions to the next round
    assert totals["deferred_hits"] <= totals["deferred"]
    assert totals["uncertified"] == 0


def test_an_old_server_gets_no_deferral(serve_pair, monkeypatch):
    cloud, device, tok = serve_pair
    ms = _methods(False)
    got_new, new = _run(serve_pair, ms, Speculation(3), True, monkeypatch)
    got_old, old = _run(serve_pair, ms, Speculation(3), False, monkeypatch)
    assert got_old == got_new
    assert old["deferred"] == 0 < new["deferred"]


def test_a_batch_or_a_stateful_rule_does_not_defer(serve_pair):
    cloud, device, tok = serve_pair
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
        engine = SteerEngine(rc, tok, device, tok, overlap=True, speculate=Speculation(3))
        two = engine.generate([SteerRequest.with_context(q, SECRET) for q in QUERIES[:2]],
                              parse_methods("closed_form@2") * 2, max_new_tokens=16)
        ada = engine.generate([SteerRequest.with_context(QUERIES[1], SECRET)], parse_methods("ada_costeer@2"),
                              max_new_tokens=16)
        engine.close()
    assert two.stats.speculation["deferred"] == 0
    assert ada.stats.speculation["deferred"] == 0


def test_the_server_keeps_last_at_the_newest_kept_row(serve_pair):
    """After a rewind that follows a verify, an ask without a position reads each row's newest kept row (the
    feature the hello announces); before the rewind it still reads the open's row."""
    cloud, _, tok = serve_pair
    ids = [[3, 5, 7, 11]]
    with start_server(cloud, tok) as srv, RemoteTopK(srv.url, TOKEN, tokenizer=tok, k=2) as rc:
        assert rc.defers_bonus
        rc.prefill([[256, 1, 72, 258]])
        opened = rc.exact([0], ids)[0]
        rc.extend(torch.tensor([[9, 10, 12]]))
        assert torch.equal(rc.exact([0], ids)[0], opened)
        at = [rc.exact([0], ids, position=j)[0] for j in range(3)]
        rc.rewind(torch.tensor([1]))
        assert torch.equal(rc.exact([0], ids)[0], at[1])
        rc.extend(torch.tensor([[13, 14]]))
        rc.rewind(torch.tensor([2]))  # every id of that verify dropped: still the row before it
        assert torch.equal(rc.exact([0], ids)[0], at[1])
