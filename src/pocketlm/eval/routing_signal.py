"""What the validation loss asks of each gate, token by token: the only token-level signal a router can follow.

CoMiGS trains the router on the user's validation loss, so whether a router *can* learn the paper's routing
(user-specific tokens to the specialist) is decided by the sign of, per position and layer,

    want = -( dL/dg_specialist - dL/dg_generalist ) x 1e3,

the change of the summed validation loss when gate weight moves from the generalist to the specialist at that
position (positive: the loss wants more specialist there). It is measured at a trained model's gates (eval mode,
every parameter frozen, a zero probe added to each layer's gates), then averaged within the specificity
buckets of `eval.routing`. `want_gap` = want on `specific` minus on `shared` tokens (positive: the loss asks for
the paper's routing); per layer its z-score (the gap over its standard error across tokens) says whether the
ask is more than token noise. `weight_gap` and `corr` (over tokens, of the specialist weight and `want`) say
whether the router followed. A gap the loss does not ask for is one no amount of router training will find.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packing import pack_blocks
from ..errors import PocketLMError
from ..moe import mixture_layers
from .routing import BUCKETS, _mean, specialist_experts, token_buckets

SCALE = 1e3


@contextlib.contextmanager
def _gate_probes(layers, store: list):
    """Each layer's router returns its gates plus a zero leaf (appended to `store` as (gates, leaf), in layer
    order): the leaf's gradient is the loss's total derivative in the gates, through the later layers' routers
    too (their inputs depend on this layer's output), as the router's own training gradient sees it."""
    for m in layers:
        orig = m.router.route

        def route(x, with_aux=False, _orig=orig):
            g, aux = _orig(x, with_aux)
            probe = torch.zeros_like(g, requires_grad=True)
            store.append((g.detach(), probe))
            return g + probe, aux
        m.router.route = route
    try:
        yield
    finally:
        for m in layers:
            m.router.__dict__.pop("route", None)


def gate_gradients(model: nn.Module, stream: torch.Tensor, *, block_len: int = 128, batch_size: int = 4,
                   pad_id: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Input ids [T] of the real positions of `stream` (consecutive blocks) and, per routed layer, the gates
    [T, E] and d(summed next-token NLL)/d(gates) [T, E]. Parameters and train mode are restored after."""
    layers = [m for _, m in mixture_layers(model) if m.router is not None]
    if not layers:
        raise PocketLMError("the model has no routed mixture layer (a strategy without a router?)")
    device = next(model.parameters()).device
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    model.requires_grad_(False)
    blocks = pack_blocks(stream, block_len, pad_id=pad_id)
    ids_out, gates, grads, store = [], [[] for _ in layers], [[] for _ in layers], []
    try:
        with _gate_probes(layers, store):
            for s in range(0, len(blocks), batch_size):
                store.clear()
                ids = blocks.input_ids[s:s + batch_size].to(device)
                mask = blocks.attention_mask[s:s + batch_size].to(device)
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                valid = (mask[:, 1:].bool() & mask[:, :-1].bool())
                F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum").backward()
                real = mask.flatten().bool()
                ids_out.append(ids.flatten()[real].cpu())
                for i, (g, probe) in enumerate(store):
                    gates[i].append(g[real].float().cpu())
                    grads[i].append(probe.grad[real].float().cpu())
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)
        model.train(was_training)
    return torch.cat(ids_out), [torch.cat(g) for g in gates], [torch.cat(g) for g in grads]


def summarize_signal(ids: torch.Tensor, gates: list[torch.Tensor], grads: list[torch.Tensor],
                     specialists: list[list[int]], r: torch.Tensor) -> dict:
    """Per layer and bucket: mean `want`, its share of positive tokens, the specialist weight; `want_gap` and its
    z-score, `weight_gap`, `corr`; the means over layers and the counts of layers whose z is beyond +-2."""
    bk = token_buckets(ids, r)
    sel = {b: bk == j for j, b in enumerate(BUCKETS)}
    layers = []
    for g, d, experts in zip(gates, grads, specialists, strict=True):
        gen = [e for e in range(g.shape[1]) if e not in experts]
        w = g[:, experts].sum(-1)
        want = -(d[:, experts].mean(-1) - d[:, gen].mean(-1)) * SCALE
        lay = {"want": {}, "want_positive": {}, "weight": {}}
        for b, s in sel.items():
            ok = bool(s.any())
            lay["want"][b] = float(want[s].mean()) if ok else None
            lay["want_positive"][b] = float((want[s] > 0).float().mean()) if ok else None
            lay["weight"][b] = float(w[s].mean()) if ok else None
        a, c = want[sel["specific"]], want[sel["shared"]]
        gap = z = None
        if a.numel() > 1 and c.numel() > 1:
            gap = float(a.mean() - c.mean())
            se = float((a.var() / a.numel() + c.var() / c.numel()).sqrt())
            z = gap / se if se > 0 else 0.0
        lay["want_gap"], lay["want_gap_z"] = gap, z
        both = torch.stack([w, want])
        lay["corr"] = float(torch.corrcoef(both)[0, 1]) if bool((both.std(-1) > 0).all()) else 0.0
        layers.append(lay)

    out = {"tokens": {b: int(s.sum()) for b, s in sel.items()}, "layers": layers}
    for key in ("want", "want_positive", "weight"):
        out[key] = {b: _mean([lay[key][b] for lay in layers]) for b in BUCKETS}
    out["want_gap"] = _mean([lay["want_gap"] for lay in layers])
    ws, wc = out["weight"]["specific"], out["weight"]["shared"]
    out["weight_gap"] = None if ws is None or wc is None else ws - wc
    out["corr"] = _mean([lay["corr"] for lay in layers])
    zs = [lay["want_gap_z"] for lay in layers if lay["want_gap_z"] is not None]
    out["layers_asking"] = sum(z > 2 for z in zs)        # the loss asks for the paper's routing
    out["layers_against"] = sum(z < -2 for z in zs)      # it asks for the opposite
    return out


def analyze_signal(model: nn.Module, stream: torch.Tensor, r: torch.Tensor, *, block_len: int = 128,
                   batch_size: int = 4, pad_id: int = 0) -> dict:
    """`summarize_signal` of one user's model on a stream (its validation split: the router's objective)."""
    ids, gates, grads = gate_gradients(model, stream, block_len=block_len, batch_size=batch_size, pad_id=pad_id)
    experts = [specialist_experts(m) for _, m in mixture_layers(model) if m.router is not None]
    return summarize_signal(ids, gates, grads, experts, r)


def signal_table(doc: dict):
    """A rich table: per user, what the validation loss asks of the gates and what the router did."""
    from rich.table import Table

    t = Table(title="what the validation loss asks of the gates (want = -dL/d(specialist - generalist weight) "
                    f"x {SCALE:g}, mean over layers; {doc.get('strategy')}, router {doc.get('router')})",
              caption="gap: specific - shared; layers +/-: layers whose want gap is > 2 / < -2 standard errors; "
                      "w gap: the router's specialist weight gap; corr: of weight and want over tokens")
    for c in ("user", *BUCKETS, "gap", "layers +/-", "w gap", "corr"):
        t.add_column(c, justify="left" if c == "user" else "right")

    def f(x, p=1):
        return "-" if x is None else f"{x:+.{p}f}"

    for u, d in doc["users"].items():
        s = d.get("signal")
        if s is None:
            continue
        t.add_row(u, *[f(s["want"][b]) for b in BUCKETS], f(s["want_gap"]),
                  f"{s['layers_asking']}/{s['layers_against']}", f(s["weight_gap"], 3),
                  f(s["corr"], 3))
    return t


__all__ = ["analyze_signal", "gate_gradients", "signal_table", "summarize_signal"]
