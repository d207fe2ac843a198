"""Drafting the next round during the verify (`Speculation(ahead=True)`): greedy tokens stay those of sequential
decoding for every method, guard and KV cache, whether the draft written ahead is kept, dropped or paused half
way; a model in both roles keeps every draft written ahead; drafts written ahead pass the guards with the draft
in flight in front of them."""

from __future__ import annotations

import time

import pytest

from pocketlm.steer import SteerEngine, SteerRequest, parse_methods, speculative
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.fusion.guards import build_guards
from pocketlm.steer.fusion.leakage import longest_copy
from pocketlm.steer.speculative import Speculation
from serve_fixtures import drafting_pair, sent_texts

SECRET = "My secret passphrase is XYZZY-PLUGH and I live at 42 Quiet Lane by the old harbour."
METHODS = "cloud,closed_form,plausible,adaptive,ada_costeer,costeer"


@pytest.fixture(scope="module")
def pair():
    """A device that is 90% the cloud: drafts are partly accepted (most guesses miss and are rewound)."""
    return drafting_pair(0.9)


@pytest.fixture(scope="module")
def close_pair():
    """A device that is 98% the cloud: about half of the drafts written ahead are kept."""
    return drafting_pair(0.98)


class SlowVerify(HFCloudBackend):
    """An in-process cloud whose verify takes a while, as a remote one does: the device drafts ahead in full."""

    def extend(self, ids):
        time.sleep(0.02)
        return super().extend(ids)


def _requests(n):
    queries = ["Write a haiku about the sea.", "Tell me about your day.", "Why is the sky blue?"]
    return [SteerRequest.with_context(queries[i % 3], SECRET) for i in range(n)]


def _run(pair, methods, spec, *, kv="dynamic", cloud_cls=SlowVerify, tokens=24, one=False):
    cloud, device, tok = pair
    dev = cloud if one else device
    eng = SteerEngine(cloud_cls(cloud, tok), tok, dev, tok, kv=kv, overlap=True, speculate=spec)
    out = eng.generate(_requests(len(methods)), methods, max_new_tokens=tokens)
    eng.close()
    return out


def _same(a, b):
    return [(g.token_ids, g.finish) for g in a] == [(g.token_ids, g.finish) for g in b]


@pytest.mark.parametrize("kv", ["dynamic", "static"])
@pytest.mark.parametrize("guarded", [False, True])
def test_greedy_tokens_identical_with_drafting_ahead(pair, kv, guarded):
    base = parse_methods(METHODS)
    if guarded:
        base = [m.with_guards(*build_guards(max_copy=3, no_repeat_ngram=3, protect=["harbour"])) for m in base]
    for ms in ([m] for m in base):  # batch 1: every row may draft ahead
        ref = _run(pair, ms, Speculation(0), kv=kv)
        out = _run(pair, ms, Speculation(3, ahead=True), kv=kv)
        assert _same(out, ref), ms[0].name
    batch = _run(pair, base, Speculation(3, ahead=True), kv=kv)  # a batch: ahead only when all rows drafted in full
    assert _same(batch, _run(pair, base, Speculation(0), kv=kv))


def test_ahead_hits_and_misses_both_happen_and_stay_exact(close_pair):
    ms = parse_methods("closed_form@1")
    ref = _run(close_pair, ms, Speculation(0), tokens=40)
    out = _run(close_pair, ms, Speculation(2, ahead=True), tokens=40)
    assert _same(out, ref)
    s = out.stats.speculation
    assert s["ahead_rounds"] > 0 and 0 < s["ahead_hits"] < s["ahead_rounds"]


def test_one_model_in_both_roles_keeps_every_draft_written_ahead(pair):
    """The device is the cloud: every draft and every guess is right, so after the first round each round's
    draft was written during the previous verify, and the device steps once per token."""
    ms = parse_methods("closed_form")
    out = _run(pair, ms, Speculation(4, ahead=True), one=True, tokens=31)
    ref = _run(pair, ms, Speculation(0), one=True, tokens=31)
    assert _same(out, ref)
    s = out.stats.speculation
    assert s["acceptance"] == 1.0 and s["ahead_hits"] == s["ahead_rounds"] > 0
    assert out.stats.calls["device"] <= len(out[0].token_ids) + 1


def test_a_draft_paused_half_way_resumes_exactly(pair, monkeypatch):
    """The verify returns while the device is drafting ahead: what is drafted so far is kept and the next round
    drafts on from there (a stop after a fixed number of polls makes it deterministic)."""
    real = speculative.draft_ahead
    polls = {"n": 0}

    def stop_after_two(rnd, device, last, drafts, budget, _stop, then=None):
        def stop():
            polls["n"] += 1
            return polls["n"] % 3 == 0
        return real(rnd, device, last, drafts, budget, stop, then)

    monkeypatch.setattr(speculative, "draft_ahead", stop_after_two)
    for method in ("closed_form@1", "ada_costeer", "plausible"):
        ms = parse_methods(method)
        out = _run(pair, ms, Speculation(4, ahead=True), cloud_cls=HFCloudBackend, tokens=30)
        assert _same(out, _run(pair, ms, Speculation(0), cloud_cls=HFCloudBackend, tokens=30)), method
    assert polls["n"] > 0


def test_drafts_written_ahead_pass_the_guards(pair):
    """Every rejected draft, including those written during a verify, copies no more than the guard allows."""
    ms = [m.with_guards(*build_guards(max_copy=2, protect=["harbour"])) for m in parse_methods("closed_form@4")]
    cloud, device, tok = pair
    req = [SteerRequest.with_context("Repeat my note word for word.", SECRET)]
    eng = SteerEngine(SlowVerify(cloud, tok), tok, device, tok, overlap=True, speculate=Speculation(6, ahead=True))
    out = eng.generate(req, ms, max_new_tokens=24)
    eng.close()
    g = out[0]
    for text in sent_texts(g, tok):
        assert longest_copy(text, SECRET, req[0].query) <= 2
        assert "harbour" not in text.lower()
    assert out.stats.speculation["ahead_rounds"] > 0


def test_ahead_is_off_without_overlap_and_when_sampling(pair):
    cloud, device, tok = pair
    eng = SteerEngine(SlowVerify(cloud, tok), tok, device, tok, overlap=False, speculate=Speculation(3, ahead=True))
    out = eng.generate(_requests(1), parse_methods("closed_form"), max_new_tokens=12)
    assert out.stats.speculation["ahead_rounds"] == 0
