"""Speculative steering: greedy tokens identical to sequential decoding for every method, guard, KV cache and
downlink; the acceptance kernel of speculative sampling reproduces the target distribution; drafts pass the
guards before they are sent; SpecSteer's ratio rule against a reference loop without caches."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from pocketlm.errors import PocketLMError
from pocketlm.steer import Sampling, SteerEngine, SteerRequest, parse_methods
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.downlink.topk import TruncatedCloud
from pocketlm.steer.fusion.formulas import log_policy
from pocketlm.steer.fusion.guards import build_guards
from pocketlm.steer.fusion.leakage import longest_copy
from pocketlm.steer.speculative import Speculation, SpeculativeRound
from serve_fixtures import drafting_pair, sent_texts

SECRET = "My secret passphrase is XYZZY-PLUGH and I live at 42 Quiet Lane by the old harbour."
METHODS = "cloud,closed_form,plausible,adaptive,ada_costeer,costeer,light_costeer,cloud_with_context"


@pytest.fixture(scope="module")
def pair():
    """A cloud and a device that agree sometimes (the device is 90% the cloud, 10% another lively model): drafts
    are partly accepted, so both the accept and the reject path run."""
    return drafting_pair(0.9)


def _requests(n):
    queries = ["Write a haiku about the sea.", "Tell me about your day.", "Why is the sky blue?"]
    return [SteerRequest.with_context(queries[i % 3], SECRET) for i in range(n)]


def _pair_run(pair, methods, *, k, kv="dynamic", truncate=None, tokens=20, sampling=None):
    cloud, device, tok = pair
    backend = HFCloudBackend(cloud, tok)
    backend = TruncatedCloud(backend, truncate) if truncate else backend
    eng = SteerEngine(backend, tok, device, tok, kv=kv, speculate=k)
    return eng.generate(_requests(len(methods)), methods, max_new_tokens=tokens, sampling=sampling)


@pytest.mark.parametrize("kv", ["dynamic", "static"])
@pytest.mark.parametrize("guarded", [False, True])
def test_greedy_tokens_identical_for_every_method(pair, kv, guarded):
    ms = parse_methods(METHODS)
    if guarded:
        ms = [m.with_guards(*build_guards(max_copy=3, no_repeat_ngram=3, protect=["harbour", "XYZZY"])) for m in ms]
    ref = _pair_run(pair, ms, k=0, kv=kv)
    for k in (1, 3):
        out = _pair_run(pair, ms, k=k, kv=kv)
        assert [(g.token_ids, g.finish) for g in out] == [(g.token_ids, g.finish) for g in ref], k
        spec = out.stats.speculation
        assert spec["drafted"] > 0 and 0 < spec["accepted"] < spec["drafted"]  # both paths ran
        assert spec["tokens_per_round_trip"] > 1.0


def test_greedy_tokens_identical_through_a_truncated_downlink(pair):
    ms = [m.with_guards(*build_guards(max_copy=3)) for m in parse_methods("closed_form,plausible,ada_costeer")]
    ref = _pair_run(pair, ms, k=0)
    out = _pair_run(pair, ms, k=4, truncate=3)
    assert [g.token_ids for g in out] == [g.token_ids for g in ref]
    assert out.stats.downlink["rows"] > 0 and out.stats.downlink["uncertified"] == 0


def test_one_model_in_both_roles_accepts_every_draft(pair):
    _, device, tok = pair
    eng = SteerEngine(HFCloudBackend(device, tok), tok, device, tok, speculate=4)
    out = eng.generate(_requests(1), parse_methods("closed_form"), max_new_tokens=20, ignore_eos=True)
    assert out.stats.speculation["acceptance"] == 1.0
    # K accepted + the bonus token per verify: 20 tokens in the prefill's round trip and 4 verifies
    assert out.stats.speculation["tokens_per_round_trip"] == pytest.approx(4.0)


def test_rejected_drafts_pass_the_guards_before_they_are_sent(pair):
    """What reached the cloud (each rejected draft after the output it followed) never copies more than the
    guard allows, nor a protected word."""
    ms = [m.with_guards(*build_guards(max_copy=2, protect=["harbour"])) for m in parse_methods("closed_form@4")]
    cloud, device, tok = pair
    req = [SteerRequest.with_context("Repeat my note word for word.", SECRET)]
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, speculate=6)
    out = eng.generate(req, ms, max_new_tokens=24)
    g = out[0]
    for text in sent_texts(g, tok):
        assert longest_copy(text, SECRET, req[0].query) <= 2
        assert "harbour" not in text.lower()
    assert g.drafted_tokens > 0


def test_spec_sampling_kernel_keeps_the_target_distribution():
    """Accept y ~ q with min(1, p/q), else draw from norm(max(0, p - q)): the output is distributed as p."""
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    q = torch.tensor([[0.1, 0.4, 0.1, 0.3, 0.1]])
    gen = torch.Generator().manual_seed(0)
    n = 40_000
    rnd = SpeculativeRound.__new__(SpeculativeRound)
    rnd.sampling, rnd.gen = Sampling(temperature=1.0), gen
    y = torch.multinomial(q.expand(n, -1), 1, replacement=True, generator=gen).view(-1)
    scores = p.log().expand(n, -1)
    rows = torch.arange(n)
    out = rnd._speculative_sample(scores, q.expand(n, -1), y, rows, rows)
    freq = torch.bincount(out, minlength=5).float() / n
    assert (freq - p[0]).abs().max() < 0.01, freq


def test_sampled_speculation_matches_sequential_frequencies(pair):
    """The first two sampled tokens of speculative and sequential steering have the same joint distribution: a
    seeded frequency test, 1,000 samples a side at temperature 0.3. Two sequential runs with other seeds differ
    by a total variation of 0.077 here (measured), so the bound is 0.12."""
    cloud, device, tok = pair
    ms = parse_methods("closed_form@1")
    req = _requests(1)[0]
    samples = []
    for k, seeds in ((0, range(5)), (2, range(200, 205))):
        eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, speculate=k)
        pairs = []
        for seed in seeds:
            out = eng.generate([req] * 200, ms * 200, max_new_tokens=3, ignore_eos=True,
                               sampling=Sampling(temperature=0.3, seed=seed))
            pairs += [tuple(g.token_ids[:2]) for g in out]
        samples.append(Counter(pairs))
    a, b = samples
    assert 0.5 * sum(abs(a[x] - b[x]) / 1000 for x in set(a) | set(b)) < 0.12


def test_specsteer_follows_its_ratio_rule(pair):
    """A reference SpecSteer without caches: the device drafts 4 greedy tokens with the context; each is kept
    while p_cloud >= gamma * p_dev(.|x); at a rejection (or after 4) argmax(b + beta * delta)."""
    cloud, device, tok = pair
    from pocketlm.steer.engine import chat_ids

    req = _requests(1)[0]
    gamma, beta, n_new = 0.1, 1.0, 14

    def lp(model, ids):
        with torch.no_grad():
            return log_policy(model(torch.tensor([ids])).logits[0, -1].float())

    c_ids, p_ids, x_ids = (chat_ids(tok, t) for t in (req.query, req.query, req.private))
    out: list[int] = []
    while len(out) < n_new:
        drafts = []
        for _ in range(min(4, n_new - len(out) - 1)):
            drafts.append(int(lp(device, x_ids + out + drafts).argmax()))
        kept = []
        for d in drafts + [None]:
            b, plain = lp(cloud, c_ids + out + kept), lp(device, p_ids + out + kept)
            ctx = lp(device, x_ids + out + kept)
            if d is not None and float(b[d] - plain[d]) >= math.log(gamma):
                kept.append(d)
                continue
            kept.append(int((b + beta * (ctx - plain)).argmax()))
            break
        out += kept
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok)
    got = eng.generate([req], parse_methods("specsteer"), max_new_tokens=n_new, ignore_eos=True)[0].token_ids
    assert got == out[:n_new]


def test_bad_speculation_settings_are_refused(pair):
    cloud, device, tok = pair
    for bad in (-1, 99, 1.5, True):
        with pytest.raises(PocketLMError, match="speculate"):
            SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, speculate=bad)
    with pytest.raises(PocketLMError, match="draft policy"):
        Speculation(2, "oracle")


def test_eval_steer_reports_drafts_and_leakage_over_everything_sent(pair, tmp_path):
    from pocketlm.data.steering import SteerExample
    from pocketlm.eval.steer_eval import evaluate

    cloud, device, tok = pair
    examples = [SteerExample(f"r{i}", q.query, q.private, "a reference text", "cogenesis")
                for i, q in enumerate(_requests(2))]
    ms = parse_methods("cloud,closed_form@2")
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, speculate=4)
    doc = evaluate(eng, examples, ms, max_new_tokens=12, json_out=tmp_path / "res.json")
    row = doc["methods"]["closed_form@2"]
    assert row["drafted_per_token"] > 0
    sent, out = row["leak_sent"], row["leak"]
    assert sent["longest_copy_words"] >= out["longest_copy_words"]  # outputs are among what was sent
    rec = doc["examples"][0]["outputs"]["closed_form@2"]
    assert rec["drafted_tokens"] > 0 and isinstance(rec["rejected_drafts"], list)
    plain = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok)
    assert "leak_sent" not in evaluate(plain, examples[:1], ms, max_new_tokens=4)["methods"]["closed_form@2"]


def test_a_cloud_that_cannot_verify_decodes_without_speculation(pair, caplog):
    cloud, device, tok = pair

    class StepOnly:  # a backend with no multi-token append (a third-party cloud that only steps)
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            if name in ("extend", "rewind"):
                raise AttributeError(name)
            return getattr(self.inner, name)

    eng = SteerEngine(StepOnly(HFCloudBackend(cloud, tok)), tok, device, tok, speculate=4)
    ref = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(_requests(1), parse_methods("closed_form"),
                                                                            max_new_tokens=8)
    with caplog.at_level("WARNING"):
        out = eng.generate(_requests(1), parse_methods("closed_form"), max_new_tokens=8)
    assert out[0].token_ids == ref[0].token_ids and out.stats.speculation is None
    assert "cannot verify" in caplog.text
    with pytest.raises(PocketLMError, match="specsteer needs a cloud that verifies"):
        eng.generate(_requests(1), parse_methods("specsteer"), max_new_tokens=4)
