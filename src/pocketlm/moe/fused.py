"""The fused mixture computation: frozen MLP projections once, only rank-r terms and activations per expert.

The first MLP projections are shared (`W x` once, plus each expert's rank-r term) and the last one is linear,
so `sum_e g_e W_down(h_e) = W_down(sum_e g_e h_e)`. What remains per expert is the rank-r algebra and the
element-wise activation on a `tokens x intermediate` tensor — on a GPU that element-wise work and its saved
activations, not the matmuls, are what make a mixture step slower than a single-LoRA step. Two ways cut it:

- **top-k dispatch** (`topk`, used whenever k < E): a token runs the activation only for its k chosen experts,
  so the element-wise work and memory are `k x` instead of `E x` a single MLP, whatever E. The per-slot rank-r
  maps use a block trick instead of a gather of per-expert matrices: the slot's rank-r vector is placed in its
  expert's block of an `E*r` vector (zeros elsewhere), and one matmul against all experts' stacked factors
  applies exactly the chosen expert. No sort, no host synchronisation, no Python loop over experts.
- **recomputation** (`recompute=True`): the element-wise block runs under activation checkpointing, so only
  its inputs (the two frozen projections and rank-r vectors) are kept for backward; the per-expert tensors
  are rebuilt during backward. Same numbers, less memory, a little more compute.

Both compute the same function as the reference path (tests compare outputs and gradients in float64).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def stacked(experts, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [E, r, in], B [E, out, r], scale) of one MLP linear across all experts."""
    A = torch.stack([getattr(ex, name).lora_A for ex in experts])
    B = torch.stack([getattr(ex, name).lora_B for ex in experts])
    return A, B, getattr(experts[0], name).scale


def _block_rows(B: torch.Tensor) -> torch.Tensor:
    """[E, out, r] -> [E*r, out]: every expert's B^T stacked, so a vector with only expert e's block filled
    times this matrix applies exactly B_e."""
    return B.permute(0, 2, 1).reshape(B.shape[0] * B.shape[2], B.shape[1])


def _maybe_checkpoint(fn, recompute: bool, *args):
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def _down(mix, gh_sum: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The frozen last projection on the gate-weighted activation sum (its bias counted once per unit gate)."""
    last_lin = getattr(mix.base, mix.family.last)
    out = last_lin(gh_sum)
    if getattr(last_lin, "bias", None) is not None:          # sum_e g_e b = b only when gates sum to 1
        out = out + (g.sum(-1, keepdim=True) - 1) * last_lin.bias
    return out


def dense(mix, x: torch.Tensor, g: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """Every expert on every token (k = E, or uniform mixing without a router): [E, N, I] activations."""
    firsts, last = mix.family.firsts, mix.family.last
    base_pre, lows, Bs = [], [], []
    scale = None
    for n in firsts:
        A, B, scale = stacked(mix.experts, n)
        base_pre.append(getattr(mix.base, n)(x))               # frozen projection once: [N, I]
        lows.append(torch.einsum("nd,erd->enr", x, A))         # [E, N, r]
        Bs.append(B)
    A_last, B_last, scale_last = stacked(mix.experts, last)

    def block(g, A_last, *tensors):
        k = len(firsts)
        pre = [bp.unsqueeze(0) + scale * torch.einsum("enr,eir->eni", lo, B)
               for bp, lo, B in zip(tensors[:k], tensors[k:2 * k], tensors[2 * k:], strict=True)]
        h = mix.act(pre)                                       # [E, N, I]
        gt = g.t().unsqueeze(-1)
        # g_e h_e is only a temporary: both consumers save h (once) and the small gates, not a second E x N x I
        return (gt * h).sum(0), torch.einsum("eni,eri->enr", h, A_last) * gt

    gh_sum, low = _maybe_checkpoint(block, recompute, g, A_last, *base_pre, *lows, *Bs)
    return _down(mix, gh_sum, g) + scale_last * torch.einsum("enr,edr->nd", low, B_last)


def topk(mix, x: torch.Tensor, g: torch.Tensor, recompute: bool = False) -> torch.Tensor:
    """Each token runs only its k chosen experts: [N, k, I] activations instead of [E, N, I]."""
    firsts, last = mix.family.firsts, mix.family.last
    num_e, k = mix.num_experts, mix.top_k
    w, idx = g.topk(k, dim=-1)                                  # the chosen experts' gates (the nonzeros of g)
    # [N, k, E, 1]; a comparison, not F.one_hot, which validates indices on the host on some devices
    onehot = (idx.unsqueeze(-1) == torch.arange(num_e, device=idx.device)).to(x.dtype).unsqueeze(-1)
    base_pre, lows, Bs = [], [], []
    scale = None
    for n in firsts:
        A, B, scale = stacked(mix.experts, n)
        base_pre.append(getattr(mix.base, n)(x))               # [N, I]
        low = torch.einsum("nd,erd->ner", x, A)                # every expert's rank-r map: cheap, [N, E, r]
        lows.append((low.unsqueeze(1) * onehot).flatten(2))    # slot's vector in its expert's block: [N, k, E*r]
        Bs.append(_block_rows(B))                              # [E*r, I]
    A_last, B_last, scale_last = stacked(mix.experts, last)
    A_cat = A_last.reshape(num_e * A_last.shape[1], A_last.shape[2])          # [E*r, I]

    def block(w, onehot, A_cat, *tensors):
        m = len(firsts)
        pre = [bp.unsqueeze(1) + scale * (lo @ B)              # [N, k, I]: chosen experts only
               for bp, lo, B in zip(tensors[:m], tensors[m:2 * m], tensors[2 * m:], strict=True)]
        h = mix.act(pre)                                       # [N, k, I]
        low = (h @ A_cat.t()).unflatten(-1, (num_e, -1)) * (onehot * w[..., None, None])  # slot's own expert block
        return (w.unsqueeze(-1) * h).sum(1), low.sum(1).flatten(1)  # [N, I], [N, E*r]

    gh_sum, low = _maybe_checkpoint(block, recompute, w, onehot, A_cat, *base_pre, *lows, *Bs)
    return _down(mix, gh_sum, g) + scale_last * (low @ _block_rows(B_last))
