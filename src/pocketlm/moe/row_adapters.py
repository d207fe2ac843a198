"""Adapters on for some rows of a batch and off for others, in one forward.

Why: a personal device model steers the cloud with `log p_personal - log p_base`; both passes should cost one
batched forward of one model, not two model copies. Inside `adapter_rows(model, on)` every mixture MLP computes
its experts only for the rows where `on` is True and the frozen base MLP for the others, and every attention
LoRA adds its update only on those rows, so an "off" row computes exactly what the base model computes.
The mask lives on the modules only inside the context (restored on exit, also on error): nothing is kept
between calls, and code outside the block always sees the plain personal model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .lora import AttnLoRALinear
from .mixture import MixtureMLP


class RowMask:
    """Which rows have their adapters on: a bool mask plus the row indices of both kinds (computed once)."""

    def __init__(self, on: torch.Tensor):
        self.on = on.bool()
        self.on_rows = self.on.nonzero().flatten()
        self.off_rows = (~self.on).nonzero().flatten()
        self.scale = self.on.float()

    def lora(self, delta: torch.Tensor) -> torch.Tensor:
        """Zero a LoRA update `[B, ...]` on the rows whose adapters are off."""
        return delta * self.scale.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))

    def mix(self, x: torch.Tensor, experts, base) -> torch.Tensor:
        """`experts(x)` on the rows with adapters on, `base(x)` on the others (`x`: `[B, T, H]`)."""
        if self.off_rows.numel() == 0:
            return experts(x)
        if self.on_rows.numel() == 0:
            return base(x)
        on = experts(x.index_select(0, self.on_rows))
        out = x.new_empty(x.shape[0], *on.shape[1:], dtype=on.dtype)
        out.index_copy_(0, self.on_rows, on)
        out.index_copy_(0, self.off_rows, base(x.index_select(0, self.off_rows)))
        return out


def _modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MixtureMLP | AttnLoRALinear)]


@contextmanager
def adapter_rows(model: nn.Module, on: torch.Tensor | None):
    """Run forwards of `model` with adapters on only for the rows where `on` is True (None: all rows on)."""
    mods = _modules(model) if on is not None else []
    if not mods:
        yield
        return
    mask = RowMask(on.to(next(model.parameters()).device))
    for m in mods:
        m.row_mask = mask
    try:
        yield
    finally:
        for m in mods:
            m.row_mask = None


def has_adapters(model: nn.Module) -> bool:
    return bool(_modules(model))
