"""Adapters on for some rows of a batch and off for others, in one forward.

Why: a personal device model steers the cloud with `log p_personal - log p_base`; both passes should cost one
batched forward of one model, not two model copies. Inside `adapter_rows(model, on)` every mixture MLP computes
its experts only for the rows where `on` is True and the frozen base MLP for the others, and every attention
LoRA adds its update only on those rows, so an "off" row computes exactly what the base model computes.
A third row mode, SHARED, runs the model with its *private* experts' LoRA off (each replaced by the frozen base
MLP, the router's gates kept) and the attention LoRA on only if it is shared: `log p_personal - log p_shared` is
then what the user's private experts add over the federation's shared parts (the `specialist` signal).
The mask lives in the modules' forward context (moe.context) only inside the block (restored on exit, also on
error): nothing is kept between calls, and code outside the block always sees the plain personal model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..errors import PocketLMError
from .context import layer_context
from .lora import AttnLoRALinear
from .mixture import MixtureMLP

# Row modes (a bool True / False reads as PERSONAL / BASE).
BASE, PERSONAL, SHARED = 0, 1, 2


class RowMask:
    """Each row's mode (BASE, PERSONAL or SHARED) plus the row indices of each mode (computed once)."""

    def __init__(self, mode: torch.Tensor):
        self.mode = mode.long()
        self.rows = {m: (self.mode == m).nonzero().flatten() for m in (BASE, PERSONAL, SHARED)}
        self.has_shared = bool(self.rows[SHARED].numel())

    def lora(self, delta: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """Zero a LoRA update `[B, ...]` on the rows where it is off (BASE rows; SHARED rows unless `shared`)."""
        scale = (self.mode == PERSONAL) | ((self.mode == SHARED) & shared)
        return delta * scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))

    def mix(self, x: torch.Tensor, experts, base, shared=None) -> torch.Tensor:
        """`experts(x)` on PERSONAL rows, `base(x)` on BASE rows, `shared(x)` on SHARED rows (`x`: `[B, T, H]`)."""
        fns = {PERSONAL: experts, BASE: base, SHARED: shared}
        live = [m for m in (PERSONAL, BASE, SHARED) if self.rows[m].numel()]
        if len(live) == 1:
            return fns[live[0]](x)
        parts = {m: fns[m](x.index_select(0, self.rows[m])) for m in live}
        first = parts[live[0]]
        out = x.new_empty(x.shape[0], *first.shape[1:], dtype=first.dtype)
        for m in live:
            out.index_copy_(0, self.rows[m], parts[m])
        return out


def _modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MixtureMLP | AttnLoRALinear)]


@contextmanager
def adapter_rows(model: nn.Module, on: torch.Tensor | None):
    """Run forwards of `model` with each row in its mode: `on` is a bool (adapters on / off) or a mode tensor
    (BASE, PERSONAL, SHARED); None: every row runs the model as it is."""
    mods = _modules(model) if on is not None else []
    if not mods:
        yield
        return
    mask = RowMask(on.to(next(model.parameters()).device))
    if mask.has_shared and any(isinstance(m, MixtureMLP) and m.shared_experts is None for m in mods):
        raise PocketLMError("a SHARED row needs a personal model loaded from a run's shared/private adapter files "
                            "(moe.personal.load_personal): this model does not know which of its parts are shared")
    with layer_context(mods, rows=mask):
        yield


def has_adapters(model: nn.Module) -> bool:
    return bool(_modules(model))
