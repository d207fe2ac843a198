"""Model families: which linears an MLP and an attention block have, and how the MLP activates.

A mixture layer, the fused paths and injection ask the family object instead of comparing family names, so a
new family (another MLP layout) is one more entry here and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MLPFamily:
    """An MLP layout: first linears (in -> intermediate), last linear (intermediate -> out), the activation
    module's attribute (a gated family multiplies it by the second first-projection), an optional dropout after
    the last linear, and the attention projections that get the shared attention LoRA."""

    name: str
    firsts: tuple[str, ...]
    last: str
    activation: str
    gated: bool
    attention: tuple[str, ...]
    dropout: str | None = None

    @property
    def projections(self) -> tuple[str, ...]:
        """Every MLP linear an expert adapts (firsts, then last)."""
        return (*self.firsts, self.last)

    def matches(self, mlp: nn.Module) -> bool:
        return all(hasattr(mlp, n) for n in (*self.projections, self.activation))

    def act(self, mlp: nn.Module, pre: list[torch.Tensor]) -> torch.Tensor:
        """The MLP's activation on the first projections' outputs (any leading shape)."""
        f = getattr(mlp, self.activation)
        return f(pre[0]) * pre[1] if self.gated else f(pre[0])

    def finish(self, mlp: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """What the MLP does after its last linear (GPT-2: residual dropout)."""
        return getattr(mlp, self.dropout)(out) if self.dropout else out


# llama-style gated MLPs (llama, qwen2, qwen3, mistral) and GPT-2 (Conv1D c_fc/c_proj)
GATED = MLPFamily("gated", ("gate_proj", "up_proj"), "down_proj", "act_fn", gated=True,
                  attention=("q_proj", "k_proj", "v_proj", "o_proj"))
GPT2 = MLPFamily("gpt2", ("c_fc",), "c_proj", "act", gated=False, attention=("c_attn", "c_proj"), dropout="dropout")
FAMILIES = {f.name: f for f in (GATED, GPT2)}


def family_of(mlp: nn.Module) -> MLPFamily | None:
    """The first family whose layout `mlp` has, None for an MLP no family describes."""
    return next((f for f in FAMILIES.values() if f.matches(mlp)), None)


def mlp_blocks(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, MLPFamily]]:
    """(block, block name, mlp, family) for each transformer block whose `mlp` a family describes (an MLP already
    turned into a mixture is not found again: it has none of a family's projections itself)."""
    found = []
    for name, module in model.named_modules():
        mlp = getattr(module, "mlp", None)
        fam = family_of(mlp) if isinstance(mlp, nn.Module) else None
        if fam is not None:
            found.append((module, name, mlp, fam))
    return found


def adapter_targets(model: nn.Module) -> list[str]:
    """Names of the linears a single LoRA adapts in `model` (every attention and MLP projection), sorted."""
    return sorted({n for *_, f in mlp_blocks(model) for n in (*f.attention, *f.projections)})
