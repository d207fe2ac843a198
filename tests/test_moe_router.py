"""The official Llama-family gate (`router="official"`): Linear -> tanh -> Linear, noise only in training from a
frozen N(0, 0.02) projection, balance loss 0.01 * (cv^2(importance) + cv^2(load)) per layer summed over layers,
and gradients only for the two gate linears the official code trains."""

from __future__ import annotations

import math

import pytest
import torch

from pocketlm.models import build_tiny
from pocketlm.moe import (
    MoEConfig,
    OfficialGate,
    balance_loss,
    inject_moe,
    mixture_layers,
    param_role,
)
from pocketlm.moe.aux import collect_aux
from pocketlm.moe.router import BALANCE_WEIGHT, ROUTERS, make_router, noisy_load


def _gate(experts=2, top_k=2, hidden=16, seed=0):
    gate = OfficialGate(hidden, experts, top_k)
    gate.reset(seed, "gate")
    return gate


def _model(**over):
    model, _ = build_tiny("tiny-llama", seed=0)
    return inject_moe(model, MoEConfig(num_experts=2, top_k=2, rank=4, seed=0, router_type="official", **over))


def test_noise_only_in_training():
    gate, x = _gate(), torch.randn(32, 16)
    gate.eval()
    a, aux = gate(x)
    b, _ = gate(x)
    assert torch.equal(a, b) and aux is None                # deterministic, no balance loss outside training
    clean = torch.softmax(gate.w_out(torch.tanh(gate.w_in(x))), -1)
    assert torch.allclose(a, clean, atol=1e-6)              # k = E: a plain softmax of the clean logits
    gate.train()
    torch.manual_seed(0)
    c, aux = gate(x)
    torch.manual_seed(1)
    d, _ = gate(x)
    assert not torch.allclose(c, d) and aux is not None     # fresh noise every training forward
    assert torch.allclose(c.sum(-1), torch.ones(32))


def test_noise_weights_are_drawn_frozen_and_not_adapters():
    model = _model()
    gate = mixture_layers(model)[0][1].router
    assert isinstance(gate, OfficialGate)
    assert 0.01 < float(gate.noise_weight.std()) < 0.04      # N(0, 0.02) at construction, not the zeros of __init__
    names = [n for n, _ in model.named_parameters() if ".router." in n]
    assert names and all(n.endswith(("w_in.weight", "w_out.weight")) for n in names)
    assert all(param_role(n) == "router" for n in names)
    assert not any("noise" in n for n, _ in model.named_parameters())   # a buffer: no optimizer, upload, checkpoint


def test_balance_loss_known_case():
    """importance = [1.5, 0.5] (cv^2 = unbiased var / mean^2 = 0.5 / 1), load = [2, 2] (cv^2 = 0) -> 0.5."""
    gates = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    assert float(balance_loss(torch.zeros(2, 2), gates)) == pytest.approx(0.5)
    # one token left expert 1 out: load [2, 1] adds var 0.5 / mean^2 2.25
    assert float(balance_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))) == pytest.approx(0.5 + 2 / 9)
    # top-1 of 2: load [1, 1] is balanced, importance [1, 1] too
    assert float(balance_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))) == pytest.approx(0.0)
    # load [2, 0]: cv^2 = 2 (unbiased var 2 / mean^2 1); importance [2, 0] likewise -> 4
    assert float(balance_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="tokens, experts"):
        balance_loss(torch.zeros(2, 3), gates)


def test_gate_returns_its_weighted_loss_and_the_model_sums_layers():
    gate, x = _gate(), torch.randn(8, 16)
    gate.train()
    torch.manual_seed(3)
    g, aux = gate(x)
    assert float(aux.detach()) == pytest.approx(BALANCE_WEIGHT * float(balance_loss(g, g).detach()), rel=1e-6)
    model = _model()
    model.train()
    with torch.no_grad(), collect_aux(model) as aux:
        assert all(m.ctx.aux.weight == 1.0 for _, m in mixture_layers(model))  # already weighted: not / n_layers
        model(input_ids=torch.randint(0, 200, (2, 12)))
    per_layer = aux.terms
    assert len(per_layer) == len(mixture_layers(model)) > 1
    assert float(aux.total()) == pytest.approx(float(sum(per_layer)), rel=1e-6)   # summed, not averaged
    assert all(m.ctx.aux is None for _, m in mixture_layers(model))


def test_gradients_reach_only_the_trained_gate_weights():
    model = _model()
    model.train()
    ids = torch.randint(0, 200, (2, 12))
    with collect_aux(model) as aux:
        out = model(input_ids=ids, labels=ids)
    (out.loss + aux.total()).backward()
    for n, p in model.named_parameters():
        if ".router." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif param_role(n) is None:
            assert p.grad is None, n                          # frozen base
    for _, m in mixture_layers(model):
        assert not m.router.noise_weight.requires_grad and m.router.noise_weight.grad is None


def test_balance_loss_alone_trains_the_gate_towards_even_importance():
    """E = k = 2: the load term is constant, the importance term pulls the mean gate to 50/50."""
    gate, x = _gate(), torch.randn(64, 16) + 1.0
    with torch.no_grad():                                   # start skewed: ~90% of the weight on expert 0
        gate.w_in.weight.fill_(0.2)
        gate.w_out.weight.copy_(torch.tensor([[1.2, 0.0], [0.0, -1.2]]))
    gate.eval()
    skew0 = abs(float(gate(x)[0][:, 0].mean()) - 0.5)
    assert skew0 > 0.3
    opt = torch.optim.SGD(gate.parameters(), lr=5.0)
    gate.train()
    for _ in range(30):
        opt.zero_grad()
        gate(x)[1].backward()
        opt.step()
    gate.eval()
    assert abs(float(gate(x)[0][:, 0].mean()) - 0.5) < skew0 / 2


def test_top_k_below_experts_uses_the_smooth_load():
    gate, x = _gate(experts=4, top_k=2), torch.randn(16, 16)
    gate.train()
    torch.manual_seed(0)
    g, aux = gate(x)
    assert ((g > 0).sum(-1) == 2).all() and math.isfinite(float(aux))
    clean = torch.randn(5, 4)
    load = noisy_load(clean, clean + 0.1, torch.ones(5, 4), 2)
    assert load.shape == (4,) and bool(((load > 0) & (load < 5)).all())


def test_linear_router_is_unchanged_and_unknown_router_is_clear():
    model, _ = build_tiny("tiny-llama", seed=0)
    lin = inject_moe(model, MoEConfig(num_experts=2, rank=4, seed=0))
    assert isinstance(mixture_layers(lin)[0][1].router, torch.nn.Linear)
    from pocketlm.errors import PocketLMError
    with pytest.raises(PocketLMError, match="unknown router"):
        MoEConfig(router_type="mlp")


@pytest.mark.parametrize("router_type", ROUTERS)
def test_both_routers_share_one_interface(router_type):
    """`route(x, with_aux)` gives float32 gates over the top-k and the balance term only when asked for;
    `balance_summed` says how `collect_aux` weighs it; `reset(seed, name)` draws by name."""
    r = make_router(router_type, 16, 4, 2)
    r.reset(0, "layer.router")
    x = torch.randn(10, 16)
    r.train()
    g, aux = r.route(x)
    assert g.dtype == torch.float32 and g.shape == (10, 4) and aux is None
    assert torch.allclose(g.sum(-1), torch.ones(10)) and ((g > 0).sum(-1) == 2).all()
    _, aux = r.route(x, with_aux=True)
    assert aux is not None and aux.ndim == 0
    assert r.balance_summed is (router_type == "official")
    again = make_router(router_type, 16, 4, 2)
    again.reset(0, "layer.router")
    assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), again.state_dict().values(), strict=True))
    again.reset(0, "other.router")
    assert not all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), again.state_dict().values(),
                                                     strict=True))
    with pytest.raises(ValueError, match="router_type"):
        make_router("mlp", 16, 4, 2)
