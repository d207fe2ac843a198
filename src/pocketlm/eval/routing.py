"""Token-level routing analysis: does a user's router send its own tokens to the specialist?

For one user of a finished run (or any mixture model) every held-out token's gate weights are recorded per layer
(`GateLog`, a routing tally of the layer's forward context, moe.context), and the weight on the specialist
experts is averaged within buckets of how specific the token is to this user.

**Specificity** of token id t for user u (`specificity`): the log2 ratio of its smoothed relative frequency in
u's training split to that in the pooled training splits of all other users,

    r_u(t) = log2( (c_u(t) + a) / (N_u + a V) ) - log2( (c_o(t) + a) / (N_o + a V) ),   a = 0.5,

where c are counts, N the split sizes and V the number of ids seen in any training split. Buckets (`BUCKETS`):
`other` r < -1 (at least 2x more frequent elsewhere), `shared` |r| <= 1, `leaning` 1 < r <= 3,
`specific` r > 3 (at least 8x more frequent in u's own data), and `unseen` (in no training split). A position is
bucketed by its *input* token, the token whose hidden state the router sees (it predicts the next one).

**Specialist weight**: the summed gate weight on the experts that stayed private (those not in the shared part of
the user's adapters); when every expert is shared or none is (2g, 2s), experts 1..E-1 (expert 0 is the generalist
by the official convention). `gap` = specialist weight on `specific` minus on `shared` tokens: about 0 for a gate
that ignores the token (a fixed 50/50 blend), positive when user-specific tokens go to the specialist.

Works for both routers (linear and the official gate): it reads the gates the layer computes, in eval mode (the
official gate without its training noise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..data.packing import pack_blocks
from ..errors import PocketLMError
from ..moe import mixture_layers
from ..moe.context import layer_context

SMOOTHING = 0.5
BUCKETS = ("other", "shared", "leaning", "specific", "unseen")
BUCKET_EDGES = {"other": (-math.inf, -1.0), "shared": (-1.0, 1.0), "leaning": (1.0, 3.0), "specific": (3.0, math.inf)}
DEFINITION = ("r = log2 of the token's smoothed (add-0.5) relative frequency in this user's training split over "
              "that in the other users' pooled training splits; buckets by the position's input token: other r<-1, "
              "shared |r|<=1, leaning 1<r<=3, specific r>3, unseen = in no training split; specialist weight = gate "
              "weight summed over the user's private experts (experts 1..E-1 when all or none are shared); "
              "gap = specific - shared")


def specificity(train: dict[str, torch.Tensor], user: str, alpha: float = SMOOTHING) -> torch.Tensor:
    """`r_u(t)` for every token id up to the largest id seen (float; NaN for ids in no training split)."""
    if user not in train:
        raise PocketLMError(f"user {user!r} not among {sorted(train)}")
    if len(train) < 2:
        raise PocketLMError("token specificity needs at least two users")
    size = 1 + max(int(t.max()) for t in train.values() if t.numel())
    counts = {u: torch.bincount(t.flatten().long(), minlength=size).double() for u, t in train.items()}
    own = counts[user]
    other = sum(c for u, c in counts.items() if u != user)
    seen = (own + other) > 0
    v = float(seen.sum())
    p_own = (own + alpha) / (own.sum() + alpha * v)
    p_other = (other + alpha) / (other.sum() + alpha * v)
    r = torch.log2(p_own / p_other).float()
    return r.masked_fill(~seen, float("nan"))


def bucket_of(r: torch.Tensor) -> torch.Tensor:
    """Bucket index (into `BUCKETS`) of each specificity value."""
    out = torch.full(r.shape, BUCKETS.index("unseen"), dtype=torch.long)
    for i, name in enumerate(BUCKETS[:-1]):
        lo, hi = BUCKET_EDGES[name]
        inside = (r > lo) & (r <= hi) if name != "shared" else (r >= lo) & (r <= hi)
        out[inside & ~torch.isnan(r)] = i
    return out


class GateLog:
    """A routing tally (the `record` field of a layer's forward context) that keeps every token's gates."""

    def __init__(self):
        self.chunks: list[torch.Tensor] = []

    def add(self, g: torch.Tensor) -> None:
        self.chunks.append(g.detach().float().cpu())

    def gates(self) -> torch.Tensor:
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, 0)


def specialist_experts(layer) -> list[int]:
    """The experts whose weight counts as the specialist's (see the module docstring)."""
    shared = layer.shared_experts or frozenset()
    private = [e for e in range(layer.num_experts) if e not in shared]
    return private if 0 < len(private) < layer.num_experts else list(range(1, layer.num_experts))


@torch.no_grad()
def record_gates(model: nn.Module, stream: torch.Tensor, *, block_len: int = 128, batch_size: int = 8,
                 pad_id: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run `model` (eval mode) over `stream` in consecutive blocks; the real positions' input ids [T] and each
    routed layer's gates [T, E] (layers without a router are left out)."""
    layers = [m for _, m in mixture_layers(model) if m.router is not None]
    if not layers:
        raise PocketLMError("the model has no routed mixture layer (a strategy without a router?)")
    device = next(model.parameters()).device
    blocks = pack_blocks(stream, block_len, pad_id=pad_id)
    logs = [GateLog() for _ in layers]
    was_training = model.training
    model.eval()
    try:
        with layer_context(layers, record=logs):
            for s in range(0, len(blocks), batch_size):
                model(input_ids=blocks.input_ids[s:s + batch_size].to(device),
                      attention_mask=blocks.attention_mask[s:s + batch_size].to(device))
    finally:
        model.train(was_training)
    real = blocks.attention_mask.flatten().bool()
    return blocks.input_ids.flatten()[real], [log.gates()[real] for log in logs]


def token_buckets(ids: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Bucket index of each position's input id (ids beyond `r`, in no training split, are `unseen`)."""
    r = torch.cat([r, torch.full((max(0, int(ids.max()) + 1 - r.numel()),), float("nan"))]) if ids.numel() else r
    return bucket_of(r[ids])


def summarize(ids: torch.Tensor, gates: list[torch.Tensor], r: torch.Tensor, specialists: list[list[int]]) -> dict:
    """Per layer and bucket: mean specialist weight and token count; `gap`; the means over layers."""
    buckets = token_buckets(ids, r)
    counts = {b: int((buckets == i).sum()) for i, b in enumerate(BUCKETS)}
    layers = []
    for i, (g, experts) in enumerate(zip(gates, specialists, strict=True)):
        w = g[:, experts].sum(-1)
        per = {}
        for j, b in enumerate(BUCKETS):
            sel = buckets == j
            per[b] = float(w[sel].mean()) if sel.any() else None
        layers.append({"layer": i, "specialists": experts, "weight": per, "all": float(w.mean()),
                       "gap": _gap(per)})
    mean = {b: _mean([lay["weight"][b] for lay in layers]) for b in BUCKETS}
    gaps = [lay["gap"] for lay in layers if lay["gap"] is not None]
    return {"tokens": counts, "layers": layers, "mean": mean, "all": _mean([lay["all"] for lay in layers]),
            "gap": _gap(mean), "gap_max": max(gaps) if gaps else None, "gap_min": min(gaps) if gaps else None}


def _gap(weights: dict) -> float | None:
    a, b = weights.get("specific"), weights.get("shared")
    return None if a is None or b is None else a - b


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def analyze_model(model: nn.Module, stream: torch.Tensor, r: torch.Tensor, *, block_len: int = 128,
                  batch_size: int = 8, pad_id: int = 0) -> dict:
    """The routing summary (`summarize`) of one user's model on a held-out stream, given the user's `r`."""
    ids, gates = record_gates(model, stream, block_len=block_len, batch_size=batch_size, pad_id=pad_id)
    experts = [specialist_experts(m) for _, m in mixture_layers(model) if m.router is not None]
    return summarize(ids, gates, r, experts)


def _run_config(run_dir: Path):
    from ..collab.config import FIELDS, TrainConfig

    hist = run_dir / "history.json"
    if not hist.is_file():
        raise PocketLMError(f"{run_dir} holds no history.json: not a finished run folder of `pocketlm train`")
    doc = json.loads(hist.read_text(encoding="utf-8"))
    # the saved config is already resolved (protocol applied); build it as is, not through load_config
    return TrainConfig(**{k: v for k, v in doc["config"].items() if k in FIELDS}), doc.get("strategy")


def analyze_run(run_dir: str | Path, *, workspace=None, max_tokens: int | None = None,
                users: list[str] | None = None, signal: bool = False) -> dict:
    """Routing analysis of every user of a finished run (`users/<user>/` adapters + `history.json`) on the
    user's test split (capped by the run's `max_eval_tokens`, then by `max_tokens`). `workspace`: a
    `collab.Workspace` of the same config (tests, sweeps), else loaded from the run's config. `signal`: also
    what the validation loss asks of the gates (eval.routing_signal), on the validation split (same caps)."""
    from ..collab import Workspace
    from ..collab.simulation import eval_stream
    from ..moe.personal import load_personal

    run = Path(run_dir)
    cfg, strategy = _run_config(run)
    ws = workspace or Workspace.load(cfg)
    train = {u: t.train for u, t in ws.data.items()}
    found = sorted(p.name for p in (run / "users").iterdir() if p.is_dir()) if (run / "users").is_dir() else []
    names = [u for u in (users or found) if u in ws.data]
    if not names:
        raise PocketLMError(f"{run}/users holds no adapters of this run's users ({sorted(ws.data)})")
    out = {"run": str(run), "strategy": strategy, "router": cfg.router, "scenario": cfg.scenario,
           "model": cfg.model, "corpus": cfg.corpus, "protocol": cfg.protocol, "split": "test",
           "definition": DEFINITION, "buckets": list(BUCKETS), "users": {}, "skipped": {}}
    for u in names:
        model = load_personal(ws.base, run / "users" / u)
        if not any(m.router is not None for _, m in mixture_layers(model)):
            out["skipped"][u] = "no router"
            continue
        stream = eval_stream(ws.data[u], cfg)
        if max_tokens:
            stream = stream[:max_tokens]
        r = specificity(train, u)
        out["users"][u] = analyze_model(model, stream, r, block_len=cfg.seq_len, batch_size=cfg.eval_batch_size,
                                        pad_id=ws.pad_id)
        if signal:
            from .routing_signal import analyze_signal

            val = ws.data[u].val[: cfg.max_eval_tokens] if cfg.max_eval_tokens else ws.data[u].val
            out["users"][u]["signal"] = analyze_signal(model, val[:max_tokens] if max_tokens else val, r,
                                                       block_len=cfg.seq_len, pad_id=ws.pad_id)
    if not out["users"]:
        raise PocketLMError(f"no user of {run} has a router ({strategy}): nothing to analyse")
    gaps = [d["gap"] for d in out["users"].values() if d["gap"] is not None]
    out["gap_mean"] = sum(gaps) / len(gaps) if gaps else None
    return out


def routing_table(doc: dict, *, per_layer: bool = True):
    """A rich table: per user (and layer) the specialist weight per bucket (token counts in the header row)."""
    from rich.table import Table

    t = Table(title=f"specialist weight by token specificity ({doc.get('strategy')}, router {doc.get('router')}, "
                    f"{doc.get('split', 'test')} split)")
    t.add_column("user")
    t.add_column("layer", justify="right")
    for b in BUCKETS:
        t.add_column(b, justify="right")
    t.add_column("gap", justify="right")

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    for u, d in doc["users"].items():
        t.add_row(u, "tokens", *[str(d["tokens"][b]) for b in BUCKETS], "", style="dim")
        if per_layer:
            for lay in d["layers"]:
                t.add_row(u, str(lay["layer"]), *[f(lay["weight"][b]) for b in BUCKETS], f(lay["gap"]))
        t.add_row(u, "mean", *[f(d["mean"][b]) for b in BUCKETS], f(d["gap"]), style="bold")
    return t


def plot_routing_buckets(doc: dict, path: str | Path, title: str = "") -> Path:
    """One panel per user: specialist weight (y) per layer (x), one line per specificity bucket."""
    from .report import _plt, _save

    plt = _plt()
    users = list(doc["users"])
    cols = min(4, len(users))
    rows = (len(users) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for i, u in enumerate(users):
        ax = axes[i // cols][i % cols]
        d = doc["users"][u]
        xs = [lay["layer"] for lay in d["layers"]]
        for b in BUCKETS:
            ys = [lay["weight"][b] if lay["weight"][b] is not None else float("nan") for lay in d["layers"]]
            if any(y == y for y in ys):
                ax.plot(xs, ys, marker="o", markersize=2, label=f"{b} ({d['tokens'][b]})")
        ax.axhline(0.5, color="grey", linestyle=":", linewidth=0.8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{u}: gap {d['gap']:+.3f}" if d["gap"] is not None else u)
        ax.set_xlabel("layer")
        ax.set_ylabel("specialist weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for j in range(len(users), rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title or f"routing by token specificity: {doc.get('strategy')}, router {doc.get('router')}")
    fig.tight_layout()
    return _save(fig, path)


__all__ = ["BUCKETS", "DEFINITION", "GateLog", "analyze_model", "analyze_run", "bucket_of", "plot_routing_buckets",
           "record_gates", "routing_table", "specialist_experts", "specificity", "summarize", "token_buckets"]

