"""CoSteer fusion: the T-step FTRL loop equals the closed form; kappa table; masks, gates, vocab alignment."""

from __future__ import annotations

import math

import pytest
import torch

from pocketlm.errors import ModelLoadError
from pocketlm.models import build_tiny, tiny_tokenizer
from pocketlm.steer.fusion.formulas import (
    AdaGate,
    AdaptiveKappa,
    closed_form,
    ftrl_loop,
    js_divergence,
    kappa_from_hparams,
    log_policy,
    plausible_closed_form,
)
from pocketlm.steer.vocab import VocabAlign

V = 50_000


def _logits(b=3, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, v, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("T", [1, 2, 5, 20])
def test_loop_equals_closed_form(T):
    c, dc, dp = _logits(seed=T, scale=1.0)
    loop = ftrl_loop(c, dc, dp, T=T)
    closed = closed_form(c, dc, dp, kappa_from_hparams(T))
    assert loop.dtype == torch.float32
    assert (loop - closed).abs().max().item() < 1e-5
    assert torch.equal(loop.argmax(-1), closed.argmax(-1))


def test_loop_equals_closed_form_wide_logits():
    """With 3x wider logits the tail log-probs reach about -70, where one fp32 ulp is 7.6e-6 and the
    loop's t*lambda*b terms (~2,900) round at 2.4e-4: the two agree to rounding, which we check in
    probability space and on the argmax."""
    c, dc, dp = _logits(seed=11, scale=3.0)
    loop, closed = ftrl_loop(c, dc, dp), closed_form(c, dc, dp, kappa_from_hparams(20))
    assert (loop.exp() - closed.exp()).abs().max().item() < 1e-5
    assert ((loop - closed).abs() / closed.abs().clamp_min(1.0)).max().item() < 2e-5
    assert torch.equal(loop.argmax(-1), closed.argmax(-1))


def test_loop_equals_closed_form_other_hparams():
    c, dc, dp = _logits(seed=7)
    kw = dict(T=10, alpha=1.5, beta=0.7, lam=2.5, eta=4.0)
    k = kappa_from_hparams(kw["T"], kw["alpha"], kw["beta"], kw["lam"], kw["eta"])
    assert (ftrl_loop(c, dc, dp, **kw) - closed_form(c, dc, dp, k)).abs().max().item() < 1e-5


def test_kappa_table():
    assert round(kappa_from_hparams(1), 4) == 0.4762
    assert round(kappa_from_hparams(20), 4) == 1.7833
    table = {2: 0.732, 3: 0.900, 5: 1.126, 10: 1.449, 50: 2.234}
    for T, k in table.items():
        assert abs(kappa_from_hparams(T) - k) < 1e-3
    assert abs(kappa_from_hparams(20, beta=2.0) - 2 * kappa_from_hparams(20)) < 1e-12  # linear in beta
    with pytest.raises(ValueError):
        kappa_from_hparams(0)


def test_zero_delta_returns_cloud_policy():
    c, d, _ = _logits(seed=3)
    for out in (ftrl_loop(c, d, d), closed_form(c, d, d, 1.78), plausible_closed_form(c, d, d, 1.78, a=1e-30)):
        assert torch.allclose(out, log_policy(c), atol=1e-5)


def test_outputs_are_normalised():
    c, dc, dp = _logits(seed=4)
    k = AdaptiveKappa(3, 1.78)(dc, dp)
    for out in (ftrl_loop(c, dc, dp), closed_form(c, dc, dp), plausible_closed_form(c, dc, dp),
                closed_form(c, dc, dp, k)):
        assert torch.logsumexp(out, -1).abs().max().item() < 1e-4


def test_masked_logits_never_nan():
    c, dc, dp = _logits(b=2, v=1000, seed=5)
    c[:, :100] = float("-inf")
    dc[:, 50:300] = float("-inf")
    dp[:, 200:400] = float("-inf")  # overlaps dc: (-inf) - (-inf) would be NaN without the finite mask
    dp[0, 999] = float("nan")
    for out in (ftrl_loop(c, dc, dp), closed_form(c, dc, dp), plausible_closed_form(c, dc, dp)):
        assert torch.isfinite(out).all()
        assert torch.logsumexp(out, -1).abs().max().item() < 1e-4
        assert out[:, :100].exp().max().item() == 0.0  # masked cloud tokens stay impossible
    assert torch.isfinite(js_divergence(dc, dp)).all()


def test_plausibility_mask_excludes_tail_tokens():
    c, dc, dp = _logits(b=2, v=500, seed=6)
    dc[:, :] = -20.0
    dc[:, 0] = 30.0  # the device pushes token 0 hard
    c[:, 0] = -30.0  # ...which the cloud finds implausible
    assert closed_form(c, dc, dp, 1.78).argmax(-1).tolist() == [0, 0]
    out = plausible_closed_form(c, dc, dp, 1.78, a=0.1)
    b = log_policy(c)
    keep = b >= b.max(-1, keepdim=True).values + math.log(0.1)
    assert out.exp()[~keep].max().item() == 0.0
    assert keep.gather(1, out.argmax(-1, keepdim=True)).all()


def test_adaptive_kappa_tracks_js():
    _, dc, dp = _logits(b=2, v=300, seed=8)
    ak = AdaptiveKappa(2, kappa=2.0, cap=3.0)
    k1 = ak(dc, dp)
    assert k1.shape == (2, 1) and torch.allclose(k1, torch.full((2, 1), 2.0))  # first token: JS / mean = 1
    k2 = ak(dp, dp)  # no context effect -> no steering
    assert torch.allclose(k2, torch.zeros(2, 1), atol=1e-5)
    k3 = ak(dc[1:] * 3, dp[1:], rows=torch.tensor([1]))  # per-row state: only row 1 updated
    assert k3.shape == (1, 1) and 0 < k3.item() <= 6.0 + 1e-6


def test_ada_gate_turns_off_for_good():
    gate = AdaGate(2, threshold=0.1, patience=3)
    confident = torch.tensor([[20.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 0 certain, row 1 uniform
    assert gate.update(confident).tolist() == [True, True]
    assert gate.update(confident).tolist() == [True, True]
    assert gate.update(confident).tolist() == [False, True]  # 3rd confident token: off
    uncertain = torch.zeros(2, 3)
    assert gate.update(uncertain).tolist() == [False, True]  # never re-enabled


def test_padded_vocab_sliced_to_common_size():
    big, tok = build_tiny("tiny-qwen2", vocab_size=300)
    small, _ = build_tiny("tiny-llama")
    align = VocabAlign.shared(tok, tok, big, small)
    assert align.size == 260
    assert align.cloud_view(torch.zeros(2, 300)).shape == (2, 260)
    assert VocabAlign.shared(tok, tok, 300, 280, to_tokenizer=False).size == 280


def _other_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    return tok


def test_differing_tokenizers_raise_clear_error():
    with pytest.raises(ModelLoadError, match="tokenizers differ.*intersection"):
        VocabAlign.shared(tiny_tokenizer(), _other_tokenizer(), 260, 262)


def test_intersection_mapping():
    a, b = tiny_tokenizer(), _other_tokenizer()
    align = VocabAlign.intersection(a, b, 260, 262)
    assert align.size == 260
    logits = torch.arange(262.0).unsqueeze(0)
    assert align.device_view(logits).shape == (1, 260)
    idx = torch.tensor([5, 259])
    assert align.to_cloud(idx).tolist() == [5, 259] and align.to_device(idx).tolist() == [5, 259]
    assert align.from_device(torch.tensor([5])).tolist() == [5]
