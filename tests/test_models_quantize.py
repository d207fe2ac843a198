"""`--device-quantize int8` (pocketlm.models.quantize): int8 weights per output channel, bf16 activations.

Why these checks: the quantized model is the device model, so speculation must stay exact with it, which needs
a kernel that computes each row on its own (torch's dynamic quantization shares one activation scale across the
batch and broke this: measured). The layer must approximate the float one, and bad requests must be refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from personal_fixtures import trained_user
from pocketlm.cli import app
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.models.quantize import Int8Linear, quantize_device_model
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.cloud.remote import RemoteCloud, RemoteTopK
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import parse_methods
from pocketlm.steer.session import load_engine
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, drafting_pair, start_server


def test_int8_linear_is_close_to_the_float_layer_and_row_independent():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    q = Int8Linear(lin)
    x = torch.randn(5, 3, 64)
    ref, got = lin(x), q(x).float()
    assert got.shape == ref.shape and q.qweight.dtype == torch.int8
    assert (got - ref).abs().max() / ref.abs().max() < 0.03
    flat = x.reshape(-1, 64)
    rows = torch.cat([q(flat[i:i + 1]) for i in range(flat.shape[0])])
    assert torch.equal(rows, q(flat))  # a row's output does not depend on the other rows of the batch


def test_speculation_stays_exact_with_an_int8_device():
    cloud, device, tok = drafting_pair(0.9)
    quantize_device_model(device, "int8")
    assert all(type(m) is not nn.Linear for m in device.modules())
    ms = parse_methods("cloud,closed_form,plausible,costeer")
    reqs = [SteerRequest.with_context(q, "I am Ann, a baker; I love the sea.") for q in ("A note?", "The sea?")] * 2
    seq = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok).generate(reqs, ms, max_new_tokens=10)
    spec = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, speculate=3).generate(reqs, ms, max_new_tokens=10)
    assert [g.token_ids for g in spec] == [g.token_ids for g in seq]
    assert spec.stats.speculation["accepted"] > 0


@pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
@pytest.mark.parametrize("fmt", ["f32", "topk"])
def test_an_int8_cloud_behind_the_step_server_verifies_as_it_steps(fmt):
    """`pocketlm serve --quantize int8`: the server's verify scores each position as its step would, so speculative
    decoding through it writes the sequential tokens (f32 rows and the certified top-k)."""
    cloud, device, tok = drafting_pair(0.9)
    quantize_device_model(cloud, "int8", role="cloud", option="--quantize")
    ms = parse_methods("cloud,closed_form,plausible")
    reqs = [SteerRequest.with_context(q, "I am Ann, a baker; I love the sea.") for q in ("A note?", "The sea?", "Hi")]

    def run(k: int):
        client = RemoteTopK if fmt == "topk" else RemoteCloud
        kw = {"k": 4} if fmt == "topk" else {}
        with start_server(cloud, tok) as srv, client(srv.url, TOKEN, tokenizer=tok, **kw) as rc:
            engine = SteerEngine(rc, tok, device, tok, speculate=k)
            out = engine.generate(reqs, ms, max_new_tokens=10)
            engine.close()
        return out
    seq, spec = run(0), run(3)
    assert [g.token_ids for g in spec] == [g.token_ids for g in seq]
    assert spec.stats.speculation["accepted"] > 0


def test_one_model_for_both_roles_keeps_the_cloud_float():
    engine = load_engine("tiny-llama", "tiny-llama", device_quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in engine.device_model.modules())
    assert not any(isinstance(m, Int8Linear) for m in engine.cloud.model.modules())
    out = engine.generate([SteerRequest.with_context("Hi?", "I like boats.")], parse_methods("closed_form"),
                          max_new_tokens=4)
    assert len(out[0].token_ids) == 4


def test_an_int8_personal_model_steers_and_speculates_exactly(tmp_path):
    """`--device-quantize int8 --adapters`: the CoMiGS personal model's frozen base layers in int8 (its mixtures
    call them as modules), its adapters in bf16; the cloud keeps its float weights; speculation stays exact."""
    base, _ = build_tiny("tiny-llama", seed=1)
    _, folder = trained_user(base, tmp_path)
    ms = parse_methods("closed_form,plausible")
    reqs = [SteerRequest.with_context(q, "I am Ann, a baker; I love the sea.") for q in ("A note?", "The sea?")]
    out = {}
    for k in (0, 3):
        engine = load_engine("tiny-llama", "tiny-llama", adapters=str(folder), device_quantize="int8", speculate=k)
        assert any(isinstance(m, Int8Linear) for m in engine.device_model.modules())
        assert not any(isinstance(m, Int8Linear) for m in engine.cloud.model.modules())
        out[k] = engine.generate(reqs, ms, max_new_tokens=12)
    assert [g.token_ids for g in out[3]] == [g.token_ids for g in out[0]]
    assert out[3].stats.speculation["accepted"] > 0


def test_bad_requests_are_refused(tmp_path):
    model, _ = build_tiny("tiny-llama", seed=1)
    with pytest.raises(PocketLMError, match="unknown device quantization 'int4'"):
        quantize_device_model(model, "int4")
    with pytest.raises(PocketLMError, match="unknown cloud quantization 'int4'"):
        quantize_device_model(model, "int4", role="cloud", option="--quantize")
    assert quantize_device_model(model, None) is model


def test_steer_takes_the_option(tmp_path):
    (tmp_path / "me.txt").write_text("I like boats.")
    res = CliRunner().invoke(app, ["steer", "Write a note.", "--cloud", "tiny-qwen2", "--local", "tiny-llama",
                                   "--context", str(tmp_path / "me.txt"), "--method", "closed_form", "--max-new-tokens", "3",
                                   "--device-quantize", "int8", "--no-guard"])
    assert res.exit_code == 0, res.output
