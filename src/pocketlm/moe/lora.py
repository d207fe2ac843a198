"""LoRA factors and the shared attention LoRA wrapper.

Scale is alpha / sqrt(r) (rsLoRA, as the official CoMiGS code), A is kaiming-uniform(a=sqrt(5)) like
nn.Linear, B starts at zero so an injected model first computes exactly what the base model computes.
Every tensor is initialised from its own generator seeded by `(seed, parameter name)`, so the generalist of a
user with 4 experts starts identical to that of a user with 2 (their averages are meaningful from round 1).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from .context import EMPTY, ForwardContext


def named_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class LoRAFactors(nn.Module):
    """One rank-r update `scale * B @ A` for a linear map in_features -> out_features."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, dtype=None, device=None):
        super().__init__()
        self.rank, self.scale = rank, alpha / math.sqrt(rank)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))

    def reset(self, seed: int, name: str) -> None:
        a = torch.empty(self.lora_A.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=named_generator(seed, name))
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of an nn.Linear or a GPT-2 Conv1D (whose weight is stored transposed)."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return w.shape[1], w.shape[0]
    return w.shape[0], w.shape[1]  # transformers.pytorch_utils.Conv1D: weight [in, out]


class AttnLoRALinear(nn.Module):
    """A frozen attention projection plus one LoRA shared by all experts (role: attn_lora)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base = base
        fin, fout = linear_shape(base)
        self.attn_lora = LoRAFactors(fin, fout, rank, alpha, dtype=base.weight.dtype, device=base.weight.device)
        self.ctx: ForwardContext = EMPTY  # row modes, only inside moe.row_adapters.adapter_rows()
        self.shared = False  # does the server average this LoRA (set on loading; SHARED rows keep it on then)

    @property
    def weight(self):  # some attention code reads proj.weight (dtype checks)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.rows is not None:
            return self.base(x) + self.ctx.rows.lora(self.attn_lora(x), self.shared)
        return self.base(x) + self.attn_lora(x)
