"""What the validation loss asks of the gates (eval.routing_signal), on the tiny three-user letter federation of
test_eval_routing: the measured gradient is the loss's true derivative (finite differences), two identical
experts give no signal at all, and `pocketlm routing --signal` prints and stores it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import tiny_workspace
from pocketlm.collab import run_strategy
from pocketlm.data.packing import pack_blocks
from pocketlm.eval.routing import specificity
from pocketlm.eval.routing_signal import SCALE, analyze_signal, gate_gradients
from pocketlm.moe import mixture_layers
from pocketlm.moe.personal import load_personal
from test_eval_routing import LETTERS, _corpus


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("signal")
    ws = tiny_workspace(_corpus(tmp / "corpus"), tmp, rounds=1, local_steps=2, router="linear")
    return ws, run_strategy(ws, "1g1s").out


def _loss(model, stream, layer: int, pos: int, eps: float) -> float:
    """Summed next-token NLL with `eps` of gate weight moved from expert 0 to expert 1 at one position of one
    layer (positions counted over the packed blocks, as gate_gradients returns them)."""
    layers = [m for _, m in mixture_layers(model)]
    m = layers[layer]
    orig = m.router.route
    seen = [0]

    def route(x, with_aux=False):
        g, aux = orig(x, with_aux)
        lo, hi = seen[0], seen[0] + g.shape[0]
        seen[0] = hi
        if lo <= pos < hi:
            g = g.double()  # the gates are float32: move eps in double, or it is rounded away
            g[pos - lo, 1] += eps
            g[pos - lo, 0] -= eps
        return g, aux
    m.router.route = route
    try:
        blocks = pack_blocks(stream, 16)
        with torch.no_grad():
            total = 0.0
            for s in range(0, len(blocks), 4):
                ids, mask = blocks.input_ids[s:s + 4], blocks.attention_mask[s:s + 4]
                logits = model(input_ids=ids, attention_mask=mask).logits.double()
                valid = mask[:, 1:].bool() & mask[:, :-1].bool()
                total += float(F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum"))
    finally:
        m.router.__dict__.pop("route", None)
    return total


def test_the_gradient_is_the_losss_derivative(federation):
    ws, run = federation
    model = load_personal(ws.base, run / "users" / "abc").double().eval()
    stream = ws.data["abc"].val[:64]
    ids, gates, grads = gate_gradients(model, stream, block_len=16)
    assert ids.numel() == stream.numel() and len(gates) == len(grads) == len(list(mixture_layers(model)))
    assert not any(p.grad is not None for p in model.parameters())
    for layer, pos in ((0, 5), (0, 40), (len(grads) - 1, 20)):
        want = float(grads[layer][pos, 1] - grads[layer][pos, 0])
        eps = 1e-3  # the routers compute in float32 even in a double model: a smaller step is rounding noise
        numeric = (_loss(model, stream, layer, pos, eps) - _loss(model, stream, layer, pos, -eps)) / (2 * eps)
        assert abs(want) > 1e-4
        assert want == pytest.approx(numeric, rel=2e-2)


def test_identical_experts_ask_for_nothing(federation):
    ws, run = federation
    model = load_personal(ws.base, run / "users" / "ijk")
    for _, m in mixture_layers(model):
        m.experts[1].load_state_dict(m.experts[0].state_dict())
    r = specificity({u: t.train for u, t in ws.data.items()}, "ijk")
    s = analyze_signal(model, ws.data["ijk"].val, r, block_len=16)
    assert s["tokens"]["specific"] > 0 and s["tokens"]["shared"] > 0
    for lay in s["layers"]:
        assert all(abs(w) < 1e-6 * SCALE for w in lay["want"].values() if w is not None)
    assert s["layers_asking"] == 0 and s["layers_against"] == 0


def test_cli_signal_prints_and_stores_it(federation, tmp_path, monkeypatch):
    from pocketlm.cli import app
    from pocketlm.collab import Workspace

    ws, run = federation
    monkeypatch.setattr(Workspace, "load", classmethod(lambda cls, cfg: ws))
    res = CliRunner().invoke(app, ["routing", str(run), "--out", str(tmp_path), "--no-per-layer", "--signal"])
    assert res.exit_code == 0, res.output
    assert "what the validation loss asks" in res.output
    doc = json.loads((tmp_path / "routing.json").read_text())
    for u in LETTERS:
        s = doc["users"][u]["signal"]
        assert set(s) >= {"want", "want_gap", "weight_gap", "corr", "layers_asking", "layers_against", "layers"}
        assert s["layers_asking"] + s["layers_against"] <= len(s["layers"])
