"""The load-balancing loss, collected through a context instead of being left on the modules.

`with collect_aux(model) as aux: loss = model(...).loss + aux.total()`: inside the context every mixture layer
with a linear router and `lb_coef > 0` appends its weighted term (`lb_coef * balance / n_layers`, so one
forward's total is `lb_coef` times the mean over layers); a router whose term is already weighted
(`balance_summed`: the official gate) appends it as is, summed over layers. Outside any context nothing is computed or stored, so a forward
leaves no autograd graph behind on a module (as HF's MoE models return router logits instead of keeping them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .context import AuxSink, layer_context
from .mixture import MixtureMLP


class AuxLosses:
    """What the layers emitted inside one `collect_aux` context (one term per layer per forward)."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []

    def total(self) -> torch.Tensor:
        """The sum of every emitted term (0-dim); zeros(()) when nothing was emitted."""
        if not self.terms:
            return torch.zeros(())
        return torch.stack([t.to(self.terms[0].device) for t in self.terms]).sum()


@contextmanager
def collect_aux(model: nn.Module):
    """Give each balancing mixture layer of `model` a sink for the duration of the context (see module doc)."""
    mixtures = [m for m in model.modules() if isinstance(m, MixtureMLP) and m.router is not None]
    summed = [m for m in mixtures if m.router.balance_summed]   # already weighted per layer, summed over layers
    averaged = [m for m in mixtures if not m.router.balance_summed and m.lb_coef > 0]
    sink = AuxLosses()
    sinks = [AuxSink(sink.terms, m.lb_coef / len(averaged)) for m in averaged]
    sinks += [AuxSink(sink.terms, 1.0) for _ in summed]
    with layer_context(averaged + summed, aux=sinks):
        yield sink
