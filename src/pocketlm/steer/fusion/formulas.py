"""CoSteer fusion rules: the faithful T-step FTRL loop, its closed form, and our variants.

The official update runs T inner FTRL steps per token. Every step is affine in (b, delta, 1) and
`log_softmax` only subtracts a constant, so the loop equals one step `log_softmax(b + kappa * delta)`
with a scalar kappa that depends on (T, alpha, beta, lambda, eta) only (research/costeer.md §2.4).
The loop is kept as the reference (tests prove equality); decoding uses the closed form.

All inputs are next-token logits `[B, V]` already aligned to one vocabulary; outputs are normalised
log-policies in fp32. Masked (-inf) logits are replaced by a large *finite* negative first, because
`(-inf) - (-inf)` in the delta would be NaN.
"""

from __future__ import annotations

import math

import torch

# Finite stand-in for -inf: exp() underflows to exactly 0, while differences and scaled sums stay finite.
NEG = -1e9

# Official defaults (paper = code): T=20, alpha=2, beta=1, lambda=2, eta=10.
DEFAULT_T, DEFAULT_ALPHA, DEFAULT_BETA, DEFAULT_LAMBDA, DEFAULT_ETA = 20, 2.0, 1.0, 2.0, 10.0


def kappa_from_hparams(T: int = DEFAULT_T, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA,
                       lam: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA) -> float:
    """kappa = k_T of k_0=0, k_t = (alpha*sum_{s<t} k_s + t*beta + k_{t-1}/eta) / (t*lambda + 1/eta).

    T=1 (LightCoSteer) -> 0.4762, T=20 (CoSteer) -> 1.7833 with the official defaults.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    ks = [0.0]
    for t in range(1, T + 1):
        ks.append((alpha * sum(ks) + t * beta + ks[-1] / eta) / (t * lam + 1.0 / eta))
    return ks[-1]


def finite(logits: torch.Tensor) -> torch.Tensor:
    """fp32 copy with -inf/NaN replaced by NEG and +inf clipped, so later arithmetic never makes NaN."""
    x = logits.float()
    return torch.nan_to_num(x, nan=NEG, neginf=NEG, posinf=-NEG).clamp_min(NEG)


def log_policy(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(finite(logits), dim=-1)


def local_delta(dev_ctx: torch.Tensor, dev_plain: torch.Tensor) -> torch.Tensor:
    """delta = log p_S(.|c,x) - log p_S(.|x): what the private context changes, computed on the device."""
    return log_policy(dev_ctx) - log_policy(dev_plain)


def ftrl_loop(cloud: torch.Tensor, dev_ctx: torch.Tensor, dev_plain: torch.Tensor, *, T: int = DEFAULT_T,
              alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, lam: float = DEFAULT_LAMBDA,
              eta: float = DEFAULT_ETA) -> torch.Tensor:
    """The official per-token loop, line by line (running-sum form of the refactored release, fp32).

    pi_0 = b; for t=1..T: U_t = alpha(pi_{t-1} - b) + beta*delta; S_t = S_{t-1} + U_t;
    pi_t = log_softmax((t*lambda*b + S_t + pi_{t-1}/eta) / (t*lambda + 1/eta)).
    """
    return ftrl_loop_bd(log_policy(cloud), local_delta(dev_ctx, dev_plain), T=T, alpha=alpha, beta=beta,
                        lam=lam, eta=eta)


def ftrl_loop_bd(b: torch.Tensor, delta: torch.Tensor, *, T: int = DEFAULT_T, alpha: float = DEFAULT_ALPHA,
                 beta: float = DEFAULT_BETA, lam: float = DEFAULT_LAMBDA, eta: float = DEFAULT_ETA) -> torch.Tensor:
    """`ftrl_loop` on a precomputed cloud log-policy `b` and delta."""
    pi, S = b, torch.zeros_like(b)
    for t in range(1, T + 1):
        U = alpha * (pi - b) + beta * delta
        S = S + U
        pi = torch.log_softmax((t * lam * b + S + pi / eta) / (t * lam + 1.0 / eta), dim=-1)
    return pi


def closed_form(cloud: torch.Tensor, dev_ctx: torch.Tensor, dev_plain: torch.Tensor,
                kappa: float | torch.Tensor = 1.7833) -> torch.Tensor:
    """log_softmax(b + kappa * delta) as one expression; `kappa` may be a scalar or a `[B, 1]` tensor."""
    return closed_form_bd(log_policy(cloud), local_delta(dev_ctx, dev_plain), kappa)


def closed_form_bd(b: torch.Tensor, delta: torch.Tensor, kappa: float | torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(b + kappa * delta, dim=-1)


def plausible_closed_form(cloud: torch.Tensor, dev_ctx: torch.Tensor, dev_plain: torch.Tensor,
                          kappa: float | torch.Tensor = 1.7833, a: float = 0.1) -> torch.Tensor:
    """Steer only among tokens the cloud finds plausible: p_cloud >= a * max p_cloud (contrastive decoding).

    Decision: implausible tokens are *excluded* (finite NEG, i.e. probability 0), not left at their cloud
    log-probability. Keeping them would let a strongly negative delta on every plausible token push a
    tail token to the top, which is exactly the hijack the mask exists to stop. The cloud's argmax is
    always in the set, so the set is never empty.
    """
    return plausible_bd(log_policy(cloud), local_delta(dev_ctx, dev_plain), kappa, a)


def plausible_bd(b: torch.Tensor, delta: torch.Tensor, kappa: float | torch.Tensor, a: float) -> torch.Tensor:
    keep = b >= (b.max(dim=-1, keepdim=True).values + math.log(a))
    steered = b + kappa * delta
    return torch.log_softmax(torch.where(keep, steered, torch.full_like(steered, NEG)), dim=-1)


def js_divergence(dev_ctx: torch.Tensor, dev_plain: torch.Tensor, *, normalised: bool = False) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between device-with and device-without context, `[B]`.
    `normalised=True`: the inputs are already log-policies."""
    lp, lq = (dev_ctx, dev_plain) if normalised else (log_policy(dev_ctx), log_policy(dev_plain))
    p, q = lp.exp(), lq.exp()
    lm = torch.log((p + q).clamp_min(1e-30) / 2)
    return 0.5 * ((p * (lp - lm)).sum(-1) + (q * (lq - lm)).sum(-1))


class AdaptiveKappa:
    """Per-token kappa_i = kappa * clip(JS_i / mean_{j<=i} JS_j, 0, cap), per row.

    Why: the official loop is one fixed kappa for every token, but the context matters at few positions
    (names, stylistic choices) and is noise elsewhere. JS between the device with and without the context
    measures "does the context matter here". Normalising by the row's running mean keeps the average
    steering budget near the base kappa (so it is comparable with `closed_form` at the same kappa) and only
    moves it towards the positions where the context speaks. `cap` bounds the per-token boost.
    State is kept per original row; `rows` selects the rows the given logits belong to.
    """

    def __init__(self, batch: int, kappa: float, cap: float = 3.0):
        self.kappa, self.cap = kappa, cap
        self.sum = torch.zeros(batch)
        self.n = torch.zeros(batch)

    def __call__(self, dev_ctx: torch.Tensor, dev_plain: torch.Tensor, rows: torch.Tensor | None = None,
                 normalised: bool = False) -> torch.Tensor:
        js = js_divergence(dev_ctx, dev_plain, normalised=normalised)
        rows = torch.arange(js.shape[0]) if rows is None else rows.cpu()
        self.sum[rows] += js.cpu()
        self.n[rows] += 1
        mean = (self.sum[rows] / self.n[rows]).clamp_min(1e-8).to(js.device)
        return (self.kappa * (js / mean).clamp(0.0, self.cap)).unsqueeze(-1)


class AdaGate:
    """AdaCoSteer's gate: cloud uncertainty u = 1 - max p_cloud below `threshold` for `patience`
    consecutive tokens switches steering off for the rest of that response (never re-enabled).
    State is kept per original row; `rows` selects the rows the given logits belong to."""

    def __init__(self, batch: int, threshold: float = 0.1, patience: int = 3):
        self.threshold, self.patience = threshold, patience
        self.run = torch.zeros(batch, dtype=torch.long)
        self.active = torch.ones(batch, dtype=torch.bool)

    def update(self, cloud: torch.Tensor, rows: torch.Tensor | None = None, normalised: bool = False) -> torch.Tensor:
        """Feed this step's cloud logits `[b, V]` (`normalised=True`: a log-policy already, whose unknown entries
        may be upper bounds, so it must not be renormalised); return which rows are still steered now."""
        rows = torch.arange(cloud.shape[0]) if rows is None else rows.cpu()
        top = cloud.max(dim=-1).values if normalised else log_policy(cloud).max(dim=-1).values
        u = (1.0 - top.exp()).cpu()
        self.run[rows] = torch.where(u < self.threshold, self.run[rows] + 1, torch.zeros_like(u, dtype=torch.long))
        self.active[rows] &= self.run[rows] < self.patience
        return self.active[rows].to(cloud.device)
