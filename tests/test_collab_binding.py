"""Binding a user's adapters into the shared model is explicit and scoped: inside `with device.bound(model)`
the model computes with that device's tensors (no copy, one shared frozen base); outside, it has its own
parameters back, so no later call can silently score another user's adapters."""

from __future__ import annotations

import pytest
import torch

from pocketlm.collab import Device, bound, load_config
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.moe import MoEConfig, inject_moe, param_role, shared_base_view


def _cfg():
    return load_config(None, {"model": "tiny-llama", "rounds": 1, "local_steps": 2, "batch_size": 2, "seq_len": 16,
                              "router_every": 2, "router_steps": 1, "seed": 0})


def _world(users=("a", "b")):
    cfg = _cfg()
    base, _ = build_tiny("tiny-llama", seed=0)
    model = inject_moe(shared_base_view(base), MoEConfig(num_experts=2, rank=4, seed=0))
    devices = {u: Device(u, model, cfg, bilevel=True, train_tokens=300, batch_size=2) for u in users}
    g = torch.Generator().manual_seed(0)
    data = {u: torch.randint(0, 200, (300,), generator=g) for u in users}
    return cfg, base, model, devices, data


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_bound_installs_by_pointer_and_restores_on_exit():
    _, base, model, devs, data = _world()
    own = dict(model.named_parameters())
    d = devs["a"]
    with d.bound(model):
        inside = dict(model.named_parameters())
        assert all(inside[n] is p for n, p in d.params.items())              # the device's tensors, no copy
        assert all(inside[n] is own[n] for n in own if param_role(n) is None)  # the same frozen base
    after = dict(model.named_parameters())
    assert all(after[n] is own[n] for n in own)
    base_ptrs = {p.data_ptr() for p in base.parameters()}
    assert all(p.data_ptr() in base_ptrs for n, p in after.items() if param_role(n) is None)


def test_outside_the_block_nobody_s_adapters_are_used():
    """After a's update the model computes as before (its own adapters); a's adapters only inside a's block."""
    _, _, model, devs, data = _world()
    ids = data["a"][:16].unsqueeze(0)
    before = _logits(model, ids)
    devs["a"].local_update(model, data["a"], data["a"], steps=2)         # binds by itself
    assert torch.equal(_logits(model, ids), before)
    with devs["a"].bound(model):
        trained_a = _logits(model, ids)
    with devs["b"].bound(model):
        untrained_b = _logits(model, ids)
    assert not torch.equal(trained_a, before)
    assert torch.allclose(untrained_b, before)                          # b's fresh adapters == the model's init


def test_blocks_nest_and_survive_exceptions():
    _, _, model, devs, data = _world()
    ids = data["a"][:16].unsqueeze(0)
    for u in devs:
        devs[u].local_update(model, data[u], data[u], steps=1)
    with devs["a"].bound(model):
        a = _logits(model, ids)
        with devs["b"].bound(model):
            b = _logits(model, ids)
        assert torch.equal(_logits(model, ids), a)                     # a again after b's block
    assert not torch.equal(a, b)
    own = dict(model.named_parameters())
    with pytest.raises(RuntimeError, match="boom"), devs["b"].bound(model):
        raise RuntimeError("boom")
    assert all(p is own[n] for n, p in model.named_parameters())


def test_wrong_model_is_refused_before_anything_changes():
    _, base, _, devs, _ = _world()
    one = inject_moe(shared_base_view(base), MoEConfig(num_experts=1, rank=4, seed=0))
    own = dict(one.named_parameters())
    with pytest.raises(AttributeError), devs["a"].bound(one):          # no experts.1 in a one-expert model
        pass
    assert all(p is own[n] for n, p in one.named_parameters())
    with pytest.raises(KeyError, match="not a parameter"), bound(one, {"lm_head.nope": torch.nn.Parameter(torch.ones(1))}):
        pass


def test_device_knows_its_expert_count():
    cfg = _cfg()
    base, _ = build_tiny("tiny-llama", seed=0)
    for e in (1, 2, 3):
        model = inject_moe(shared_base_view(base), MoEConfig(num_experts=e, rank=4, seed=0))
        assert Device("u", model, cfg, bilevel=True, train_tokens=10, batch_size=2).num_experts == e


def test_binding_keeps_the_parameter_names_and_their_order():
    """Binding re-registers parameters through nn.Module's public attribute assignment: a state dict, an
    optimizer built inside the block and `named_parameters` see the same names in the same order."""
    _, _, model, devs, _ = _world()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    with devs["a"].bound(model):
        assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
        assert all(model.get_parameter(n) is p for n, p in devs["a"].params.items())
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys


def test_download_takes_shared_tensors_only_and_checks_shapes():
    _, _, _, devs, _ = _world()
    d = devs["a"]
    shared = next(n for n in d.params if param_role(n) == "generalist")
    private = next(n for n in d.params if param_role(n) == "specialist")
    before = d.params[private].detach().clone()
    d.download({shared: torch.full_like(d.params[shared], 0.5), private: torch.ones_like(before),
                "not.a.tensor.of.this.device": torch.ones(1)}, lambda n: param_role(n) == "generalist")
    assert torch.all(d.params[shared] == 0.5) and torch.equal(d.params[private], before)
    with pytest.raises(PocketLMError, match="shape"):
        d.download({shared: torch.ones(1)}, lambda n: True)
