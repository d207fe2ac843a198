"""What one forward of an adapter layer needs beyond its input, held in one object and set only inside a block.

Three callers change how a mixture (or attention LoRA) layer runs: `adapter_rows` (row modes: adapters on for
some rows of a batch), `collect_aux` (a sink for the balance loss) and `RoutingRecorder` (routing statistics).
Each sets its own field of the layer's `ctx` inside a `with layer_context(...)` block and restores it on exit,
also on error, so a forward outside every block sees the empty context and keeps nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch


@dataclass
class AuxSink:
    """Where a layer appends its weighted balance term (`weight * aux`); one list shared by all layers."""

    terms: list[torch.Tensor]
    weight: float

    def add(self, aux: torch.Tensor) -> None:
        self.terms.append(self.weight * aux)


@dataclass
class RoutingTally:
    """Sum of the generalist's gate weight (a device tensor: a float() per forward would make every GPU step
    wait on the host) and the tokens it was summed over."""

    gate0: torch.Tensor | float = 0.0
    tokens: int = 0

    def add(self, g: torch.Tensor) -> None:
        with torch.no_grad():
            self.gate0 = self.gate0 + g[:, 0].float().sum()
        self.tokens += g.shape[0]

    def share(self) -> float | None:
        return float(self.gate0) / self.tokens if self.tokens else None


@dataclass(frozen=True)
class ForwardContext:
    """`rows`: each row's adapter mode (a `row_adapters.RowMask`); `aux`: the balance-loss sink; `record`: the
    routing tally. None: not asked for."""

    rows: object | None = None
    aux: AuxSink | None = None
    record: RoutingTally | None = None


EMPTY = ForwardContext()  # what a layer's `ctx` is outside every block


@contextmanager
def layer_context(layers: list, **per_layer):
    """Set these context fields on each layer for the duration of the block, then put back what each field
    was (only these fields, so blocks of different callers nest in any order). A value is either one object
    for every layer or a list with one per layer."""
    layers = list(layers)
    values = {k: v if isinstance(v, list) else [v] * len(layers) for k, v in per_layer.items()}
    previous = [{k: getattr(m.ctx, k) for k in per_layer} for m in layers]
    for i, m in enumerate(layers):
        m.ctx = replace(m.ctx, **{k: v[i] for k, v in values.items()})
    try:
        yield
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m.ctx = replace(m.ctx, **prev)
