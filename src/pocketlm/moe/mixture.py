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
"""

from __future__ import annotations

import torch
from torch import nn

from . import fused
from .fused import FAMILIES
from .lora import LoRAFactors, linear_shape
from .router import ROUTERS, OfficialGate


class Expert(nn.Module):
    """One expert = one LoRA per MLP linear (the frozen weights live once, in the mixture)."""

    def __init__(self, mlp: nn.Module, family: str, rank: int, alpha: float):
        super().__init__()
        firsts, last = FAMILIES[family]
        for name in (*firsts, last):
            lin = getattr(mlp, name)
            fin, fout = linear_shape(lin)
            self.add_module(name, LoRAFactors(fin, fout, rank, alpha, dtype=lin.weight.dtype, device=lin.weight.device))


class MixtureMLP(nn.Module):
    def __init__(self, mlp: nn.Module, family: str, *, num_experts: int, top_k: int, rank: int, alpha: float,
                 path: str, router: bool, lb_coef: float, recompute: bool = False, router_type: str = "linear"):
        super().__init__()
        self.base = mlp  # frozen; keeps its own activation (and GPT-2's dropout)
        self.family, self.path, self.lb_coef, self.recompute = family, path, lb_coef, recompute
        self.num_experts, self.top_k = num_experts, min(top_k, num_experts)
        self.experts = nn.ModuleList(Expert(mlp, family, rank, alpha) for _ in range(num_experts))
        self.router = None
        if router and num_experts > 1:
            hidden = linear_shape(getattr(mlp, FAMILIES[family][0][0]))[0]
            w = mlp.c_fc.weight if family == "gpt2" else mlp.gate_proj.weight
            if router_type not in ROUTERS:
                raise ValueError(f"router_type must be one of {ROUTERS}, got {router_type!r}")
            if router_type == "official":   # Llama-family gate with its own (summed) balance loss: router.py
                self.router = OfficialGate(hidden, num_experts, top_k, dtype=w.dtype, device=w.device)
            else:
                self.router = nn.Linear(hidden, num_experts, bias=False, dtype=w.dtype, device=w.device)
        self.row_mask = None  # set only inside moe.row_adapters.adapter_rows()
        self.shared_experts: frozenset[int] | None = None  # which experts the server averages (set on loading)
        # Nothing a forward computes stays on the module: the balance loss goes to a sink that exists only
        # inside `collect_aux` ((terms list, weight)), routing statistics to one that exists only inside
        # `RoutingRecorder` ([sum of gate-0 weight as a device tensor, tokens]: a float() per layer per forward
        # would make every GPU step wait on the host; they are read when the recorder closes).
        self.aux_sink: tuple[list, float] | None = None
        self.record: list | None = None

    # -- gates -------------------------------------------------------------------------------------
    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """[N, E] mixture weights (official semantics: top-k>1 renormalises over the k raw logits)."""
        n, e = x.shape[0], self.num_experts
        if self.router is None:
            return x.new_full((n, e), 1.0 / e)
        if isinstance(self.router, OfficialGate):
            g, aux = self.router(x)  # aux: 0.01 * balance loss in training, None in eval
            if self.aux_sink is not None and aux is not None:
                terms, weight = self.aux_sink
                terms.append(weight * aux)
            return g.to(x.dtype)
        logits = self.router(x)
        if self.top_k == 1:
            probs = torch.softmax(logits.float(), -1)
            top, idx = probs.max(-1, keepdim=True)
            g = torch.zeros_like(probs).scatter(-1, idx, top)
        elif self.top_k == e:
            g = torch.softmax(logits.float(), -1)
        else:
            top, idx = logits.float().topk(self.top_k, -1)
            g = torch.zeros_like(logits, dtype=torch.float32).scatter(-1, idx, torch.softmax(top, -1))
        if self.aux_sink is not None:
            terms, weight = self.aux_sink
            terms.append(weight * self._balance_loss(logits, g))
        return g.to(x.dtype)

    def _balance_loss(self, logits: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Switch-style E * sum_i f_i P_i (f: share of top-k slots, P: mean router prob).

        With E = k = 2 this is identically 1 with zero gradient, as in the official GPT-2 path (comigs.md §1.6).
        """
        e = self.num_experts
        f = (g > 0).float().mean(0) / self.top_k
        p = torch.softmax(logits.float(), -1).mean(0)
        return e * (f * p).sum()

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_mask is not None and x.dim() == 3:  # inside moe.row_adapters.adapter_rows()
            return self.row_mask.mix(x, self._mixture, self.base, self._shared_only)
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
        if self.record is not None and live is None:  # routing statistics of the personal model only
            with torch.no_grad():
                self.record[0] = self.record[0] + g[:, 0].float().sum()
                self.record[1] += g.shape[0]
        if self.path == "reference" or live is not None:
            out = self._reference(flat, g, live)
        elif self.path == "fused" and self.router is not None and self.top_k < self.num_experts:
            out = fused.topk(self, flat, g, self.recompute)
        else:
            out = fused.dense(self, flat, g, self.recompute)
        if self.family == "gpt2":
            out = self.base.dropout(out)
        return out.reshape(*shape[:-1], out.shape[-1])

    def act(self, pre: list[torch.Tensor]) -> torch.Tensor:
        """The base MLP's activation on the first projections' outputs (any leading shape)."""
        if self.family == "gated":
            return self.base.act_fn(pre[0]) * pre[1]
        return self.base.act(pre[0])

    def _reference(self, x: torch.Tensor, g: torch.Tensor, live: frozenset[int] | None = None) -> torch.Tensor:
        """Each expert runs the whole MLP; an expert not in `live` (None: all live) runs it without its LoRA."""
        firsts, last = FAMILIES[self.family]
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
