"""The device's bi-level update: experts on train, router on validation, clean gradients by default, the
official leakage on request, the cosine schedule, and the router phase every tau steps."""

from __future__ import annotations

import math

import pytest
import torch

from pocketlm.collab import Device, cosine_factor, load_config
from pocketlm.models import build_tiny
from pocketlm.moe import MoEConfig, inject_moe, param_role


def _setup(**over):
    cfg = load_config(None, {"model": "tiny-llama", "rounds": 2, "local_steps": 3, "batch_size": 2, "seq_len": 16,
                             "router_every": 3, "router_steps": 2, "seed": 0, **over})
    model, _ = build_tiny("tiny-llama", seed=0)
    model = inject_moe(model, MoEConfig(num_experts=2, top_k=2, rank=4, seed=0))
    dev = Device("u", model, cfg, bilevel=True, train_tokens=500, batch_size=cfg.batch_size)
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 256, (500,), generator=g)
    val = torch.randint(0, 256, (200,), generator=g)
    return cfg, model, dev, train, val


def _snapshot(dev, role):
    return {n: p.detach().clone() for n, p in dev.params.items() if param_role(n) == role}


def _changed(before, dev):
    return any(not torch.equal(t, dev.params[n]) for n, t in before.items())


def test_cosine_schedule_endpoints():
    assert cosine_factor(0, 200, 0.1) == 1.0
    assert math.isclose(cosine_factor(200, 200, 0.1), 0.1)
    assert math.isclose(cosine_factor(100, 200, 0.1), 0.55)


def test_router_learns_only_in_its_phase():
    cfg, model, dev, train, val = _setup()
    router0 = _snapshot(dev, "router")
    gen0 = _snapshot(dev, "generalist")
    dev.local_update(model, train, val, steps=2)           # before tau=3: no router phase yet
    assert not _changed(router0, dev) and _changed(gen0, dev)
    dev.local_update(model, train, val, steps=1)           # step 3: a router phase follows
    assert _changed(router0, dev)
    assert dev.step == 3 and dev.sched.last_epoch == 3


def test_clean_mode_leaves_no_gradients_behind():
    cfg, model, dev, train, val = _setup()
    dev.local_update(model, train, val, steps=3)
    assert all(p.grad is None for p in dev.params.values())
    assert all(p.requires_grad for p in dev.params.values())


def test_official_compat_reproduces_the_leakage():
    """Each optimizer zeroes only its own tensors: router gradients pile up over expert steps and expert
    gradients over the router phase (comigs.md §2.4)."""
    cfg, model, dev, train, val = _setup(official_compat=True)
    dev.local_update(model, train, val, steps=1)
    router_grads = [p.grad for p in dev.router_params]
    assert all(g is not None and g.abs().sum() > 0 for g in router_grads)
    first = [g.clone() for g in router_grads]
    dev.local_update(model, train, val, steps=1)
    assert any(not torch.equal(a, p.grad) for a, p in zip(first, dev.router_params, strict=True))  # accumulated
    dev.local_update(model, train, val, steps=1)           # step 3 -> router phase -> expert grads left over
    assert all(p.grad is not None for p in dev.expert_params)


def test_clean_and_compat_differ_but_start_equal():
    """Same seed, same batches: the first expert step is identical; leakage changes later steps."""
    outs = {}
    for compat in (False, True):
        cfg, model, dev, train, val = _setup(official_compat=compat)
        outs[compat] = dev.local_update(model, train, val, steps=5)
    assert outs[False][0] == pytest.approx(outs[True][0], abs=1e-6)
    assert outs[False][4] != pytest.approx(outs[True][4], abs=1e-7)


def test_non_finite_loss_is_skipped_not_applied():
    cfg, model, dev, train, val = _setup()
    before = {n: p.detach().clone() for n, p in dev.params.items()}
    with torch.no_grad():
        model.get_input_embeddings().weight[5] = float("nan")  # the frozen base, shared by every binding
    train = torch.full((100,), 5)
    losses = dev.local_update(model, train, val, steps=2)
    assert all(math.isnan(x) for x in losses) and dev.skipped == 2
    assert all(torch.equal(before[n], p) for n, p in dev.params.items())


def test_device_state_round_trips():
    cfg, model, dev, train, val = _setup()
    dev.local_update(model, train, val, steps=3)
    state = dev.state_dict()
    cfg2, model2, dev2, _, _ = _setup()
    dev2.load_state_dict(state)
    a = dev.local_update(model, train, val, steps=2)
    b = dev2.local_update(model2, train, val, steps=2)
    assert a == b
