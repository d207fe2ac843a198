"""The mixture MLP: E LoRA experts over one frozen MLP, mixed per token by a learned router.

Expert e computes the full MLP with `W + s B_e A_e` on every MLP linear; the layer returns
`sum_e g_e(x) MLP_e(x)`. Because the activation sits between the linears, the mixture is over expert
*outputs*, and each expert runs its own activation (CoMiGS §1.2).

Three paths compute the same function:
- `reference`: each expert runs the whole MLP, as the official code does (E frozen projections per linear);
- `fused_dense`: the frozen projections run once whatever E; every expert's rank-r terms and activation run
  on every token (see `fused.py`);
- `fused` (default): `fused_dense` when every expert is used (k = E, or no router), else top-k dispatch, where
  each token runs the activation of its k chosen experts only.
`recompute=True` rebuilds the per-expert activations in backward instead of storing them (fused paths).

The layer asks its family (moe.family) for projections and activation and its router (moe.router) for gates, so
it never branches on which family or router it has; what a forward needs beyond `x` (row modes, a balance-loss
sink, a routing tally) is its `ctx` (moe.context), set only inside the blocks that need it.
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .context import EMPTY, ForwardContext
from .family import MLPFamily
from .lora import LoRAFactors, linear_shape
from .router import make_router


class Expert(nn.Module):
    """One expert = one LoRA per MLP linear (the frozen weights live once, in the mixture)."""

    def __init__(self, mlp: nn.Module, family: MLPFamily, rank: int, alpha: float):
        super().__init__()
        for name in family.projections:
            lin = getattr(mlp, name)
            fin, fout = linear_shape(lin)
            self.add_module(name, LoRAFactors(fin, fout, rank, alpha, dtype=lin.weight.dtype, device=lin.weight.device))


class MixtureMLP(nn.Module):
    def __init__(self, mlp: nn.Module, family: MLPFamily, *, num_experts: int, top_k: int, rank: int,
                 alpha: float, path: str, router: bool, lb_coef: float, recompute: bool = False,
                 router_type: str = "linear"):
        super().__init__()
        self.base = mlp  # frozen; keeps its own activation (and GPT-2's dropout)
        self.family, self.path, self.lb_coef, self.recompute = family, path, lb_coef, recompute
        self.num_experts, self.top_k = num_experts, min(top_k, num_experts)
        self.experts = nn.ModuleList(Expert(mlp, family, rank, alpha) for _ in range(num_experts))
        self.router = None
        if router and num_experts > 1:
            first = getattr(mlp, family.firsts[0])
            self.router = make_router(router_type, linear_shape(first)[0], num_experts, top_k,
                                      dtype=first.weight.dtype, device=first.weight.device)
        self.shared_experts: frozenset[int] | None = None  # which experts the server averages (`mark_shared`)
        # Nothing a forward computes stays on the module: row modes, the balance-loss sink and the routing tally
        # exist only inside the blocks that set them (moe.context).
        self.ctx: ForwardContext = EMPTY

    def mark_shared(self, experts) -> None:
        """Record which experts came from the shared (server-averaged) part: SHARED rows keep only those on."""
        self.shared_experts = frozenset(experts)

    # -- gates -------------------------------------------------------------------------------------
    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[N, E] mixture weights (official semantics: top-k>1 renormalises over the k raw logits)."""
        n, e = x.shape[0], self.num_experts
        if self.router is None:
            return x.new_full((n, e), 1.0 / e)
        g, aux = self.router.route(x, with_aux=self.ctx.aux is not None)
        if aux is not None:
            self.ctx.aux.add(aux)
        return g.to(x.dtype)

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ctx.rows is not None and x.dim() == 3:  # inside moe.row_adapters.adapter_rows()
            return self.ctx.rows.mix(x, self._mixture, self.base, self._shared_only)
        return self._mixture(x)

    def _shared_only(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture with the private experts' LoRA off (each is the frozen base MLP), the gates kept: the
        personal model minus this is, to first order, the private experts' own gated contribution."""
        return self._mixture(x, live=self.shared_experts or frozenset())

    def _mixture(self, x: torch.Tensor, live: frozenset[int] | None = None) -> torch.Tensor:
        """`live`: only these experts' LoRA is on (the reference path computes it); None: every expert's."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        g = self.gates(flat)
        if self.ctx.record is not None and live is None:  # routing statistics of the personal model only
            self.ctx.record.add(g)
        if self.path == "reference" or live is not None:
            out = self._reference(flat, g, live)
        elif self.path == "fused" and self.router is not None and self.top_k < self.num_experts:
            out = fused.topk(self, flat, g, self.recompute)
        else:
            out = fused.dense(self, flat, g, self.recompute)
        out = self.family.finish(self.base, out)
        return out.reshape(*shape[:-1], out.shape[-1])

    def act(self, pre: list[torch.Tensor]) -> torch.Tensor:
        """The base MLP's activation on the first projections' outputs (any leading shape)."""
        return self.family.act(self.base, pre)

    def _reference(self, x: torch.Tensor, g: torch.Tensor, live: frozenset[int] | None = None) -> torch.Tensor:
        """Each expert runs the whole MLP; an expert not in `live` (None: all live) runs it without its LoRA."""
        firsts, last = self.family.firsts, self.family.last
        out, plain = 0, None
        for e, expert in enumerate(self.experts):
            if live is not None and e not in live:
                if plain is None:
                    plain = getattr(self.base, last)(self.act([getattr(self.base, n)(x) for n in firsts]))
                out = out + g[:, e:e + 1] * plain
                continue
            pre = [getattr(self.base, n)(x) + getattr(expert, n)(x) for n in firsts]
            h = self.act(pre)
            y = getattr(self.base, last)(h) + getattr(expert, last)(h)
            out = out + g[:, e:e + 1] * y
        return out
