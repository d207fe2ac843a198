"""Fusion rules and guards as objects: each rule validates its own parameters, declares its streams, and a
guard composes after any rule; every stream implements the one protocol; no import cycle between streams."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.formulas import closed_form_bd
from pocketlm.steer.fusion.guards import Guard, NoRepeatNGram
from pocketlm.steer.fusion.methods import get_method, parse_methods
from pocketlm.steer.fusion.rules import Adaptive, ClosedForm, FTRLLoop, Gated, Plausible, StepView
from pocketlm.steer.streams.device import DeviceStreams
from pocketlm.steer.streams.dynamic import LMStream
from pocketlm.steer.streams.protocol import CloudBackend, Stream
from pocketlm.steer.streams.static import StaticLMStream

STEER = Path(__file__).resolve().parents[1] / "src" / "pocketlm" / "steer"


@pytest.fixture(scope="module")
def models():
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    device, _ = build_tiny("tiny-llama", seed=2)
    return cloud, device, tok


@pytest.mark.parametrize("spec", ["closed_form@nan", "closed_form@inf", "plausible@-1", "adaptive@-inf",
                                  "ada_costeer@NaN"])
def test_non_finite_or_negative_kappa_rejected(spec):
    with pytest.raises(PocketLMError, match="finite number >= 0"):
        get_method(spec)


@pytest.mark.parametrize("make,msg", [
    (lambda: FTRLLoop(T=0), "T must be"), (lambda: FTRLLoop(eta=0.0), "eta > 0"),
    (lambda: FTRLLoop(alpha=float("nan")), "alpha must be finite"), (lambda: Plausible(a=0.0), "plausibility"),
    (lambda: Adaptive(cap=float("inf")), "cap"), (lambda: Gated(patience=0), "patience"),
    (lambda: Gated(threshold=2.0), "threshold"), (lambda: ClosedForm(kappa=True), "number"),
])
def test_each_rule_validates_its_parameters(make, msg):
    with pytest.raises(PocketLMError, match=msg):
        make()


def test_rules_declare_their_streams():
    assert get_method("cloud").rule.cloud_prompt == "query" and not get_method("cloud").rule.uses_device
    assert get_method("cloud_with_context").private is False
    dev = get_method("device_with_context").rule
    assert dev.cloud_prompt is None and dev.needs_ctx and not dev.needs_plain
    assert get_method("costeer").rule.kappa_value() == pytest.approx(1.7833, abs=1e-4)
    with pytest.raises(PocketLMError, match="takes no kappa"):
        get_method("light_costeer@1")


def test_stateful_rules_start_fresh_per_generation():
    rule = Gated(kappa=1.0, threshold=0.5, patience=1)
    a, b = rule.start(2), rule.start(2)
    confident = torch.log_softmax(torch.tensor([[30.0, 0.0, 0.0], [30.0, 0.0, 0.0]]), -1)
    view = StepView(confident, confident, confident, torch.tensor([0, 1]))
    _, on = a.fuse(view)
    assert on.tolist() == [False, False] and a.needs_device(torch.tensor([0, 1])).tolist() == [False, False]
    assert b.needs_device(torch.tensor([0, 1])).tolist() == [True, True]  # b's state is its own
    assert rule.state is None


def test_a_rule_maps_scores_like_its_formula():
    g = torch.Generator().manual_seed(0)
    b, c, p = (torch.log_softmax(torch.randn(3, 40, generator=g), -1) for _ in range(3))
    out, steered = ClosedForm(0.7).fuse(StepView(b, c, p, torch.arange(3)))
    assert torch.allclose(out, closed_form_bd(b, c - p, 0.7)) and steered.all()


def test_guard_composes_after_any_rule(models):
    """A no-repeat-2-gram guard on top of three different rules: no output repeats a bigram, rows without the
    guard decode exactly what they decode alone."""
    cloud, device, tok = models
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok)
    r = SteerRequest.with_context("Write a haiku.", "I sail at dawn.")
    guard = NoRepeatNGram(2)
    assert isinstance(guard, Guard)
    plain = parse_methods("cloud,closed_form,plausible")
    guarded = [m.with_guards(guard) for m in plain]
    out = eng.generate([r] * 6, plain + [m for m in guarded], max_new_tokens=24, ignore_eos=True)
    for g in out[3:]:
        bigrams = list(zip(g.token_ids, g.token_ids[1:], strict=False))
        assert len(bigrams) == len(set(bigrams))
    alone = eng.generate([r] * 3, plain, max_new_tokens=24, ignore_eos=True)
    assert [g.token_ids for g in out[:3]] == [g.token_ids for g in alone]
    assert any(a.token_ids != b.token_ids for a, b in zip(out[:3], out[3:], strict=True))  # the guard acted
    assert sum(g.guard_rejections for g in out[3:]) > 0 and all(g.guard_rejections == 0 for g in out[:3])
    with pytest.raises(PocketLMError, match="n-gram size"):
        NoRepeatNGram(0)


def test_every_stream_implements_the_one_protocol(models):
    cloud, device, tok = models
    for s in (LMStream(device), StaticLMStream(device), DeviceStreams(device, 0)):
        assert isinstance(s, Stream)
    assert isinstance(HFCloudBackend(cloud, tok), CloudBackend)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_no_import_cycle_between_the_two_streams():
    assert not any(m.endswith("static") for m in _imports(STEER / "streams" / "dynamic.py"))
    assert not any(m.endswith("dynamic") for m in _imports(STEER / "streams" / "static.py"))
    proc = subprocess.run([sys.executable, "-c", "import pocketlm.steer.streams.static, sys; "
                           "assert 'pocketlm.steer.streams.dynamic' not in sys.modules"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_steering_step_emits_no_library_warning(models, recwarn, caplog):
    """`make demo` printed transformers' `past_key_values` FutureWarning mid-output: the cache keyword follows
    the installed transformers now."""
    cloud, device, tok = models
    for kv in ("dynamic", "static"):
        eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, kv=kv)
        with caplog.at_level("WARNING"):
            eng.generate([SteerRequest.with_context("Hi.", "ctx")], [get_method("closed_form")], max_new_tokens=3)
    assert not [w for w in recwarn if "cache" in str(w.message) or "past_key_values" in str(w.message)]
    assert not [r for r in caplog.records if r.name.startswith("transformers")]


def test_request_builds_the_device_prompt():
    r = SteerRequest.with_context("Q?", "  my notes  ")
    assert r.private == "my notes\n\nQ?" and r.context == "my notes"
    assert SteerRequest.with_context("Q?", "  ").private is None
