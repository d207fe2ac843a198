"""One forward context per adapter layer: row modes, the balance-loss sink and the routing tally live in the
layer's `ctx` only inside the blocks that set them, compose in one forward, and are gone afterwards."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pocketlm.models import build_tiny
from pocketlm.moe import AttnLoRALinear, MixtureMLP, MoEConfig, RoutingRecorder, collect_aux, inject_moe
from pocketlm.moe.context import EMPTY, AuxSink, layer_context
from pocketlm.moe.row_adapters import adapter_rows


def _model():
    model = inject_moe(build_tiny("tiny-llama", seed=0)[0], MoEConfig(num_experts=2, rank=4, lb_coef=0.5))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(n)))
    return model


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MixtureMLP | AttnLoRALinear)]


def test_blocks_set_their_own_field_and_restore_it_in_any_order():
    layers = [SimpleNamespace(ctx=EMPTY) for _ in range(2)]
    sink = AuxSink([], 1.0)
    rows = layer_context(layers, rows="mask")
    aux = layer_context(layers, aux=[sink, sink])
    rows.__enter__()
    aux.__enter__()
    assert all(m.ctx.rows == "mask" and m.ctx.aux is sink for m in layers)
    rows.__exit__(None, None, None)            # the outer block ends first: the inner one's field stays
    assert all(m.ctx.rows is None and m.ctx.aux is sink for m in layers)
    aux.__exit__(None, None, None)
    assert all(m.ctx == EMPTY for m in layers)
    with pytest.raises(RuntimeError), layer_context(layers, rows="mask"):
        raise RuntimeError("boom")
    assert all(m.ctx == EMPTY for m in layers)


def test_rows_aux_and_routing_compose_in_one_forward_and_leave_nothing():
    model = _model()
    ids = torch.randint(0, 260, (3, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        with collect_aux(model) as aux, RoutingRecorder(model) as rec, \
                adapter_rows(model, torch.tensor([True, False, True])):
            mixed = model(input_ids=ids).logits
    assert torch.allclose(mixed[[0, 2]], alone[[0, 2]], atol=1e-5)
    assert not torch.allclose(mixed[1], alone[1], atol=1e-5)        # the base row ran without adapters
    assert len(aux.terms) == 2 and set(rec.stats) == {0, 1}
    assert all(m.ctx == EMPTY for m in _layers(model))
