"""The routers a mixture layer can use: the one-layer linear router and the official Llama-family gate.

Both have one interface, so a mixture layer never asks which one it holds:
- `route(x, with_aux) -> (gates [N, E] float32, aux or None)`: the mixture weights and, when asked for (and
  defined in the current mode), this layer's balance term;
- `balance_summed`: False when the layer's `lb_coef` weighs the term and `collect_aux` averages it over layers,
  True when the term is already weighted and summed over layers;
- `reset(seed, name)`: draw the weights from generators named after the router's module name.

- `linear` (pocketlm's default, the official **GPT-2** router, models/gating.py): `Linear(d -> E)`, no noise;
  an optional Switch-style balance loss `E * sum_i f_i P_i` (`lb_coef`, mean over layers).
- `official` (the official **Llama** gate, `TopKBalancedNoisyGate` with `gate_network="mlp"`, models/moe_experts.py
  of comigs-icml2025/codebase at 2ac0eac): `Linear(d -> E) -> tanh -> Linear(E -> E)`, both without bias and
  trained. In training mode the logits get noise `N(0, 1) * (softplus(x W_noise^T) + 0.01)`, where `W_noise` is
  drawn N(0, 0.02) once at construction and never trained (the official code never lists it as trainable; here
  it is a buffer, so no optimizer, upload or checkpoint of adapters can see it). No noise in eval mode. The gate
  weights are the softmax over the top-k (noisy) logits, scattered into E slots, for every k (so k = 1 gives a
  weight of exactly 1, as in the official gate).
  Its balance loss is `0.01 * (cv^2(importance) + cv^2(load))` per layer, **summed** over layers (not averaged),
  where importance = summed gate weights per expert and load = tokens routed per expert (or, in training with
  noise and k < E, the smooth probability that each expert stays in the top k). With E = k = 2 the load is
  constant and only the importance term acts: it pulls the mean gate towards 50/50.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions.normal import Normal

from .lora import named_generator

ROUTERS = ("linear", "official")
BALANCE_WEIGHT = 0.01        # the official gate's balance-loss weight per layer (configuration_llama_moe.py)
NOISE_EPSILON = 0.01         # floor of the noise scale
INIT_STD = 0.02              # HF post_init: every nn.Linear N(0, 0.02), the frozen noise projection included


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation (unbiased variance / mean^2); 0 for a single expert."""
    if x.shape[0] == 1:
        return x.new_zeros((), dtype=torch.float32)
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


def balance_loss(logits: torch.Tensor, gates: torch.Tensor, load: torch.Tensor | None = None) -> torch.Tensor:
    """The official gate's per-layer balance loss, unweighted: `cv^2(importance) + cv^2(load)`.

    `logits` [N, E] are the (noisy) router logits and `gates` [N, E] the scattered top-k weights (zero for
    unchosen experts). `load` defaults to the number of tokens that chose each expert, which is what the official
    code uses in eval and whenever k = E; pass `noisy_load(...)` for training with noise and k < E.
    Callers add `BALANCE_WEIGHT * balance_loss(...)` for every layer and **sum** over layers.
    """
    if logits.shape != gates.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and gates {tuple(gates.shape)} must both be [tokens, experts]")
    importance = gates.float().sum(0)
    if load is None:
        load = (gates > 0).float().sum(0)
    return cv_squared(importance) + cv_squared(load)


def noisy_load(clean: torch.Tensor, noisy: torch.Tensor, noise_std: torch.Tensor, top_k: int) -> torch.Tensor:
    """Smooth per-expert load of noisy top-k (Shazeer et al. 2017, as the official gate computes it for k < E):
    the probability, under re-drawn noise, that each expert's logit stays in the top k."""
    m = min(top_k + 1, clean.shape[-1])
    top, _ = noisy.topk(m, dim=-1)
    thr_in, thr_out = top[:, top_k:top_k + 1], top[:, top_k - 1:top_k]
    normal = Normal(0.0, 1.0)
    is_in = (noisy - clean) > thr_in          # the official code compares the noise alone with the threshold
    p_in = normal.cdf((clean - thr_in) / noise_std)
    p_out = normal.cdf((clean - thr_out) / noise_std)
    return torch.where(is_in, p_in, p_out).sum(0)


def _normal_(t: torch.Tensor, generator: torch.Generator) -> None:
    """Fill `t` with N(0, INIT_STD) drawn in float32 on the CPU (the same numbers on any device and dtype)."""
    w = torch.empty(t.shape)
    nn.init.normal_(w, 0.0, INIT_STD, generator=generator)
    with torch.no_grad():
        t.copy_(w)


class LinearRouter(nn.Linear):
    """`Linear(d -> E)` without bias; gates: softmax over all E (k = E), the top-1 probability (k = 1), or the
    softmax over the top-k logits (1 < k < E). Its forward returns the logits, as an nn.Linear."""

    balance_summed = False

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, dtype=None, device=None):
        super().__init__(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.num_experts, self.top_k = num_experts, min(top_k, num_experts)

    def reset(self, seed: int, name: str) -> None:
        _normal_(self.weight, named_generator(seed, name))

    def route(self, x: torch.Tensor, with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self(x)
        if self.top_k == 1:
            probs = torch.softmax(logits.float(), -1)
            top, idx = probs.max(-1, keepdim=True)
            g = torch.zeros_like(probs).scatter(-1, idx, top)
        elif self.top_k == self.num_experts:
            g = torch.softmax(logits.float(), -1)
        else:
            top, idx = logits.float().topk(self.top_k, -1)
            g = torch.zeros_like(logits, dtype=torch.float32).scatter(-1, idx, torch.softmax(top, -1))
        return g, (self.balance(logits, g) if with_aux else None)

    def balance(self, logits: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Switch-style E * sum_i f_i P_i (f: share of top-k slots, P: mean router prob), unweighted.

        With E = k = 2 this is identically 1 with zero gradient, as in the official GPT-2 path (comigs.md §1.6).
        """
        f = (g > 0).float().mean(0) / self.top_k
        p = torch.softmax(logits.float(), -1).mean(0)
        return self.num_experts * (f * p).sum()


class OfficialGate(nn.Module):
    """Linear -> tanh -> Linear gate with frozen-weight noisy top-k in training (see the module docstring).

    `forward(x)` returns `(gates [N, E] float32, aux)` where `aux` is this layer's weighted balance loss
    (`BALANCE_WEIGHT * balance_loss`) in training mode and None in eval mode.
    """

    balance_summed = True

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, dtype=None, device=None):
        super().__init__()
        self.num_experts, self.top_k = num_experts, min(top_k, num_experts)
        self.w_in = nn.Linear(hidden, num_experts, bias=False, dtype=dtype, device=device)
        self.w_out = nn.Linear(num_experts, num_experts, bias=False, dtype=dtype, device=device)
        self.register_buffer("noise_weight", torch.zeros(num_experts, hidden, dtype=dtype, device=device))

    def reset(self, seed: int, name: str) -> None:
        """Draw every weight N(0, 0.02), each from its own generator (`name.w_in`, `name.w_out`, `name.noise`)."""
        for suffix, t in (("w_in", self.w_in.weight), ("w_out", self.w_out.weight), ("noise", self.noise_weight)):
            _normal_(t, named_generator(seed, f"{name}.{suffix}"))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.route(x, with_aux=True)

    def route(self, x: torch.Tensor, with_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The gates; the weighted balance loss only when asked for and in training (None otherwise)."""
        clean = self.w_out(torch.tanh(self.w_in(x)))
        noisy, std = clean, None
        if self.training:
            std = F.softplus(F.linear(x, self.noise_weight)) + NOISE_EPSILON
            noisy = clean + torch.randn_like(clean) * std
        top, idx = noisy.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(noisy, dtype=torch.float32).scatter(-1, idx, torch.softmax(top.float(), -1))
        if not (self.training and with_aux):
            return gates, None
        load = noisy_load(clean.float(), noisy.float(), std.float(), self.top_k) if self.top_k < self.num_experts \
            else None
        return gates, BALANCE_WEIGHT * balance_loss(noisy, gates, load)


def make_router(router_type: str, hidden: int, num_experts: int, top_k: int, *, dtype=None, device=None) -> nn.Module:
    """A router by its config name (`ROUTERS`)."""
    if router_type not in ROUTERS:
        raise ValueError(f"router_type must be one of {ROUTERS}, got {router_type!r}")
    cls = OfficialGate if router_type == "official" else LinearRouter
    return cls(hidden, num_experts, top_k, dtype=dtype, device=device)
