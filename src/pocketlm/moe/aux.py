"""The load-balancing loss, collected through a context instead of being left on the modules.

`with collect_aux(model) as aux: loss = model(...).loss + aux.total()`: inside the context every mixture layer
with a router and `lb_coef > 0` appends its weighted term (`lb_coef * balance / n_layers`, so one forward's
total is `lb_coef` times the mean over layers). Outside any context nothing is computed or stored, so a forward
leaves no autograd graph behind on a module (as HF's MoE models return router logits instead of keeping them).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .mixture import MixtureMLP
from .router import OfficialGate


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
    official = [m for m in mixtures if isinstance(m.router, OfficialGate)]
    linear = [m for m in mixtures if not isinstance(m.router, OfficialGate) and m.lb_coef > 0]
    layers = linear + official
    sink = AuxLosses()
    previous = [m.aux_sink for m in layers]
    for m in linear:
        m.aux_sink = (sink.terms, m.lb_coef / len(linear))
    for m in official:  # the official gate's loss is already weighted (0.01) and summed over layers
        m.aux_sink = (sink.terms, 1.0)
    try:
        yield sink
    finally:
        for m, p in zip(layers, previous, strict=True):
            m.aux_sink = p
