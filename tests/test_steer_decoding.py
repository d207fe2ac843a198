"""Steering decoder: KV cache == full re-forward, batched == one-by-one, EOS/max tokens, sampling,
the cloud never receives the private context, padded vocabularies and tokenizer checks."""

from __future__ import annotations

import pytest
import torch

from pocketlm.cli.demo import steered_vs_plain
from pocketlm.errors import ModelLoadError, PocketLMError
from pocketlm.models import build_tiny, tiny_tokenizer
from pocketlm.steer.cloud.in_process import CloudBackend, HFCloudBackend
from pocketlm.steer.engine import Sampling, SteerEngine, SteerRequest, chat_ids
from pocketlm.steer.fusion.formulas import closed_form
from pocketlm.steer.fusion.methods import get_method, parse_methods

SECRET = "My secret passphrase is XYZZY-PLUGH and I live at 42 Quiet Lane."


@pytest.fixture(scope="module")
def models():
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)  # padded head, like Qwen 7B
    device, _ = build_tiny("tiny-llama", seed=2)
    return cloud, device, tok


def engine(models, **kw):
    cloud, device, tok = models
    return SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, **kw)


def req(q="Write a haiku.", ctx=SECRET):
    return SteerRequest(q, f"{ctx}\n\n{q}")


def test_kv_cached_equals_full_reforward(models):
    cloud, device, tok = models
    r = req()
    out = engine(models).generate([r], [get_method("closed_form")], max_new_tokens=6, ignore_eos=True)[0]
    pc, pq, px = chat_ids(tok, r.query), chat_ids(tok, r.query), chat_ids(tok, r.private)
    y: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            zc = cloud(torch.tensor([pc + y])).logits[:, -1, :260]
            zq = device(torch.tensor([pq + y])).logits[:, -1, :260]
            zx = device(torch.tensor([px + y])).logits[:, -1, :260]
            y.append(int(closed_form(zc, zx, zq, 1.7833).argmax(-1)))
    assert out.token_ids == y


@pytest.mark.parametrize("fused", [True, False])
def test_batched_equals_one_by_one(models, fused):
    eng = engine(models, fuse_device_streams=fused)
    reqs = [req("Hi."), req("Tell me about the sea, please, in detail.", "ctx A"), req("Why?", SECRET * 2)]
    ms = parse_methods("costeer,plausible,adaptive")
    batched = eng.generate(reqs, ms, max_new_tokens=7)
    for r, m, b in zip(reqs, ms, batched, strict=True):
        single = eng.generate([r], [m], max_new_tokens=7)[0]
        assert single.token_ids == b.token_ids and single.finish == b.finish


def test_fused_and_separate_device_streams_agree(models):
    ms = parse_methods("closed_form,adaptive,device_with_context")
    a = engine(models).generate([req()] * 3, ms, max_new_tokens=6)
    b = engine(models, fuse_device_streams=False).generate([req()] * 3, ms, max_new_tokens=6)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


def test_overlapped_cloud_step_gives_identical_tokens(models):
    """The cloud step in a worker thread (overlap) changes timing only: same tokens, same EOS, ragged batch."""
    reqs = [req("Hi."), req("Tell me about the sea.", "ctx A"), req("Why?", SECRET)]
    ms = parse_methods("costeer,plausible,cloud")
    a = engine(models).generate(reqs, ms, max_new_tokens=9)
    eng = engine(models, overlap=True)
    b = eng.generate(reqs, ms, max_new_tokens=9)
    assert [(g.token_ids, g.finish) for g in a] == [(g.token_ids, g.finish) for g in b]
    assert b.stats.calls["cloud"] == b.stats.calls["device"] and b.stats.timings["cloud"] > 0
    eng.close()


def test_all_methods_run_and_costeer_equals_closed_form(models):
    names = "cloud,cloud_with_context,device_with_context,costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer"
    ms = parse_methods(names, "0.4762")
    gens = engine(models).generate([req()] * len(ms), ms, max_new_tokens=6)
    by = {g.method: g for g in gens}
    assert by["costeer"].token_ids == by["closed_form"].token_ids
    assert by["light_costeer"].token_ids == by["closed_form@0.4762"].token_ids
    assert all(t < 260 for g in gens for t in g.token_ids)  # padded rows never chosen
    assert by["cloud"].steered_tokens == 0 and by["costeer"].steered_tokens == len(by["costeer"].token_ids)
    eng = engine(models)  # rows in a mixed batch (different cloud prompts, left padded) == each alone
    for name in ("cloud_with_context", "device_with_context", "cloud", "adaptive"):
        assert eng.generate([req()], [get_method(name)], max_new_tokens=6)[0].token_ids == by[name].token_ids


class ScriptedCloud:
    """A CloudBackend that emits a scripted token sequence per row (argmax), to test EOS handling."""

    def __init__(self, scripts: list[list[int]], vocab: int = 260, eos: int = 258, confidence: float = 30.0):
        self.scripts, self.vocab_rows, self.eos_token_ids = scripts, vocab, {eos}
        self.confidence = confidence
        self.live: list[int] = []
        self.step_no = 0

    def _logits(self):
        z = torch.zeros(len(self.live), self.vocab_rows)
        for p, r in enumerate(self.live):
            s = self.scripts[r]
            z[p, s[min(self.step_no, len(s) - 1)]] = self.confidence
        return z

    def prefill(self, prompts, expand=None):
        self.live = list(range(len(expand if expand is not None else prompts)))
        self.step_no = 0
        return self._logits()

    def step(self, token_ids):
        assert token_ids.numel() == len(self.live)
        self.step_no += 1
        return self._logits()

    def extend(self, token_ids):  # a draft: the scripted rows after each appended position
        out = []
        for _ in range(token_ids.shape[1]):
            self.step_no += 1
            out.append(self._logits())
        return out

    def rewind(self, drop):
        self.step_no -= int(drop.max())  # rows share one script position; tests rewind rows alike

    def keep(self, rows):
        self.live = [self.live[i] for i in rows.tolist()]

    def release(self):
        self.live = []

    def reserve(self, new_tokens):
        pass

    def cache_modes(self):
        return ("scripted",)

    def set_cache_mode(self, mode):
        if mode not in ("auto", "scripted"):
            raise PocketLMError(f"no kv mode {mode}")


def test_scripted_backend_satisfies_protocol():
    assert isinstance(ScriptedCloud([[1]]), CloudBackend)


def test_per_row_eos_and_max_tokens(models):
    _, device, tok = models
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    cloud = ScriptedCloud([[10, 11, eos], [20, 21, 22, 23, 24, eos], [30] * 50], eos=eos)
    eng = SteerEngine(cloud, tok, device, tok)
    m = get_method("cloud")
    gens = eng.generate([req()] * 3, [m] * 3, max_new_tokens=8)
    assert [g.token_ids for g in gens] == [[10, 11], [20, 21, 22, 23, 24], [30] * 8]
    assert [g.finish for g in gens] == ["eos", "eos", "length"]
    gens = eng.generate([req()], [m], max_new_tokens=8, ignore_eos=True)
    assert len(gens[0].token_ids) == 8


def test_ada_gate_stops_device_streams(models):
    _, device, tok = models
    cloud = ScriptedCloud([[65] * 20])  # always certain -> gate closes after 3 tokens
    eng = SteerEngine(cloud, tok, device, tok)
    out = eng.generate([req()], [get_method("ada_costeer")], max_new_tokens=10, ignore_eos=True)
    g = out[0]
    assert g.steered_tokens == 2 and len(g.token_ids) == 10
    assert g.token_ids[2:] == [65] * 8
    assert out.stats.calls["device"] == 3  # prefill + 2 steps, then the device streams stop for good
    assert out.stats.calls["cloud"] == 10


class RecordingCloud(HFCloudBackend):
    """Records every token id that reaches the cloud."""

    def __init__(self, model, tok):
        super().__init__(model, tok)
        self.seen: list[int] = []

    def prefill(self, prompts, expand=None):
        for p in prompts:
            self.seen.extend(p)
        return super().prefill(prompts, expand)

    def step(self, token_ids):
        self.seen.extend(token_ids.tolist())
        return super().step(token_ids)


def test_cloud_never_sees_the_context(models):
    cloud_model, device, tok = models
    rec = RecordingCloud(cloud_model, tok)
    eng = SteerEngine(rec, tok, device, tok)
    ms = parse_methods("cloud,device_with_context,costeer,light_costeer,closed_form,plausible,adaptive,ada_costeer")
    eng.generate([req()] * len(ms), ms, max_new_tokens=5)
    seen = tok.decode(rec.seen)
    assert "XYZZY" not in seen and "Quiet Lane" not in seen and "Write a haiku." in seen
    secret_ids = tok("XYZZY", add_special_tokens=False)["input_ids"]
    assert not any(rec.seen[i:i + len(secret_ids)] == secret_ids for i in range(len(rec.seen)))
    rec.seen.clear()  # the non-private upper bound does send it: the recorder works
    eng.generate([req()], [get_method("cloud_with_context")], max_new_tokens=2)
    assert "XYZZY" in tok.decode(rec.seen)


def test_sampling_seeded_and_top_p(models):
    eng = engine(models)
    m = [get_method("closed_form")]
    a = eng.generate([req()], m, max_new_tokens=8, sampling=Sampling(1.0, 0.9, seed=3))[0].token_ids
    b = eng.generate([req()], m, max_new_tokens=8, sampling=Sampling(1.0, 0.9, seed=3))[0].token_ids
    assert a == b
    greedy = eng.generate([req()], m, max_new_tokens=8)[0].token_ids
    tiny_p = eng.generate([req()], m, max_new_tokens=8, sampling=Sampling(1.0, 1e-9, seed=5))[0].token_ids
    assert tiny_p == greedy
    with pytest.raises(PocketLMError):
        Sampling(temperature=-1)


def test_differing_tokenizers_rejected_and_intersection_option(models):
    cloud, device, tok = models
    other = tiny_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ModelLoadError, match="differ"):
        SteerEngine(HFCloudBackend(cloud, other), other, device, tok)
    eng = SteerEngine(HFCloudBackend(cloud, other), other, device, tok, vocab="intersection")
    g = eng.generate([req()], [get_method("closed_form")], max_new_tokens=4)[0]
    assert len(g.token_ids) >= 1 or g.finish == "eos"


def test_method_errors(models):
    with pytest.raises(PocketLMError, match="unknown steering method"):
        get_method("nope")
    with pytest.raises(PocketLMError, match="takes no kappa"):
        get_method("costeer@2")
    assert get_method("closed_form@0.5").rule.kappa == 0.5
    with pytest.raises(PocketLMError, match="needs a private context"):
        engine(models).generate([SteerRequest("q")], [get_method("costeer")], max_new_tokens=2)


def test_demo_function():
    plain, steered = steered_vs_plain("tiny-llama", "tiny-llama", SECRET, "Say hello.", max_new_tokens=5,
                                      device="cpu")
    assert isinstance(plain, str) and isinstance(steered, str)


@pytest.mark.parametrize("kv", ["static", "dynamic"])
def test_device_equal_to_cloud_at_kappa_one_recovers_cloud_with_context(models, kv):
    """With the cloud model on the device, b + 1*(log p_ctx - log p_plain) = log p_ctx: the closed form at
    kappa 1 must decode exactly what the cloud writes when it sees the context (an end-to-end identity through
    both stream kinds, the device batch, and the fusion). Seen on the real 1.5B pair too (docs/results.md)."""
    cloud, _, tok = models
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, cloud, tok, kv=kv)
    reqs = [req(), req("Tell me about the sea.", "I am a sailor from Genoa.")]
    for r in reqs:
        a, b = eng.generate([r, r], parse_methods("closed_form@1,cloud_with_context"), max_new_tokens=8,
                            ignore_eos=True)
        assert a.token_ids == b.token_ids
        c = eng.generate([r], [get_method("costeer")], max_new_tokens=8, ignore_eos=True)[0]
        assert c.steered_tokens == 8  # kappa 1.78 overshoots the context: a different decoding, still valid
