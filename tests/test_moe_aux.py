"""The mixture layer keeps nothing between calls: the balance loss is collected with `collect_aux`, routing
statistics only by an opt-in `RoutingRecorder`, and no autograd graph stays reachable from the modules."""

from __future__ import annotations

import dataclasses

import torch

from pocketlm.models import build_tiny
from pocketlm.moe import MixtureMLP, MoEConfig, RoutingRecorder, collect_aux, inject_moe


def _model(experts=4, top_k=2, lb_coef=0.01, seed=0):
    model = inject_moe(build_tiny("tiny-llama")[0], MoEConfig(num_experts=experts, top_k=top_k, lb_coef=lb_coef))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a sharp router, so the balance terms differ between layers
        for n, p in model.named_parameters():
            if ".router." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _reachable_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors reachable from the modules' attributes (lists, tuples, dicts followed), parameters excluded."""
    found, seen = [], set()

    def walk(obj, depth=0):
        if id(obj) in seen or depth > 6:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, list | tuple | set):
            for x in obj:
                walk(x, depth + 1)
        elif isinstance(obj, dict):
            for x in obj.values():
                walk(x, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):   # the layers' forward context
            walk(vars(obj), depth + 1)

    for m in module.modules():
        for k, v in vars(m).items():
            if k not in ("_parameters", "_modules"):
                walk(v)
    return found


def test_no_graph_stays_on_modules_after_forward_and_backward(graph_tensors):
    model = _model()
    ids = torch.randint(0, 260, (2, 16))
    with collect_aux(model) as aux:
        loss = model(input_ids=ids, labels=ids).loss
    (loss + aux.total()).backward()
    assert not any(t.grad_fn is not None for t in _reachable_tensors(model))
    assert all(m.ctx.aux is None and m.ctx.record is None for m in model.modules() if isinstance(m, MixtureMLP))
    del loss, aux
    assert graph_tensors() == []
    model(input_ids=ids)  # a forward without any context retains nothing either
    assert graph_tensors() == []


def test_aux_total_is_coef_times_mean_over_layers():
    """The old semantics: lb_coef * mean over layers of E * sum_i f_i P_i, recomputed here from the logits."""
    model = _model(experts=4, top_k=2, lb_coef=0.3)
    logits = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: logits.append(out.detach()))
             for m in model.modules() if isinstance(m, MixtureMLP)]
    ids = torch.randint(0, 260, (2, 16), generator=torch.Generator().manual_seed(1))
    with collect_aux(model) as aux:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    per_layer = []
    for lg in logits:
        top = lg.topk(2, -1).indices
        f = torch.zeros_like(lg).scatter(-1, top, 1.0).mean(0) / 2
        per_layer.append(4 * (f * lg.softmax(-1).mean(0)).sum())
    assert len(aux.terms) == len(logits) == 2
    assert torch.allclose(aux.total(), 0.3 * torch.stack(per_layer).mean())
    aux.total().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if ".router." in n)


def test_aux_edge_cases():
    ids = torch.randint(0, 260, (2, 16))
    two = _model(experts=2, top_k=2, lb_coef=1.0)  # E = k = 2: the official term is the constant 1 (comigs.md §1.6)
    with collect_aux(two) as aux:
        two(input_ids=ids)
    assert torch.allclose(aux.total(), torch.tensor(1.0))
    off = _model(lb_coef=0.0)  # disabled: nothing emitted, total is a 0-dim zero
    with collect_aux(off) as aux:
        off(input_ids=ids)
    assert aux.terms == [] and aux.total().ndim == 0 and float(aux.total()) == 0.0


def test_routing_recorder_is_the_only_source_of_statistics():
    model = _model()
    ids = torch.randint(0, 260, (2, 16))
    model(input_ids=ids)
    assert all(not isinstance(v, torch.Tensor) for m in model.modules() if isinstance(m, MixtureMLP)
               for v in vars(m).values())
    with RoutingRecorder(model) as rec:
        model(input_ids=ids[:1])
        model(input_ids=ids[1:])
    assert set(rec.stats) == {0, 1} and all(0.0 <= v <= 1.0 for v in rec.stats.values())
    assert all(m.ctx.record is None for m in rec.layers)
