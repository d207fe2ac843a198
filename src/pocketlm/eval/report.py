"""Reports people would rather look at than read: perplexity curves and routing heatmaps (PNG), text tables.

matplotlib runs headless (Agg); every function takes plain dicts (the JSON a run writes), so plots can be
re-made from saved results without re-running anything.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """One panel per user: test perplexity vs round, one line per strategy (rounds that were evaluated)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    users = sorted({u for h in histories.values() for e in h for u in e.get("per_user_ppl", {})})
    if not users:
        raise ValueError("no evaluated rounds to plot")
    cols = min(4, len(users))
    rows = (len(users) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    last_round = max(e["round"] for h in histories.values() for e in h)
    for i, user in enumerate(users):
        ax = axes[i // cols][i % cols]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, hist in histories.items():
            pts = [(e["round"], e["per_user_ppl"][user]) for e in hist if user in e.get("per_user_ppl", {})]
            if len(pts) == 1 and last_round > 0:  # no training (pretrained): a flat reference line
                ax.axhline(pts[0][1], linestyle="--", color="grey", label=name)
            elif pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=name)
        ax.set_title(user)
        ax.set_xlabel("round")
        ax.set_ylabel("test perplexity")
        ax.grid(alpha=0.3)
    for j in range(len(users), rows * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "per-user test perplexity")
    fig.tight_layout()
    return _save(fig, path)


def plot_routing(routing: dict[str, dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Heatmap: share of tokens' gate weight on the generalist, per layer (x) and user (y)."""
    plt = _plt()
    users = list(routing)
    if not users:
        raise ValueError("no routing statistics to plot (strategy without a router?)")
    layers = sorted({int(k) for r in routing.values() for k in r})
    grid = [[routing[u].get(str(layer), float("nan")) for layer in layers] for u in users]
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(layers) + 2), 0.5 * len(users) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="coolwarm_r", vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(users)), users)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=7)
    ax.set_xlabel("layer")
    fig.colorbar(im, ax=ax, label="gate weight on the generalist")
    ax.set_title(title or "routing: generalist share per layer")
    fig.tight_layout()
    return _save(fig, path)


def plot_personal_tradeoff(doc: dict, path: str | Path, title: str = "") -> Path:
    """What a user tunes kappa on: mean target match (y) against the cloud's perplexity of the output (x, log), one
    line per steered method through its kappas, the unsteered references as single marked points. Takes the JSON
    `eval-personal` writes (older files without "columns" plot their methods as single points)."""
    from .personal_eval import UNSTEERED

    plt = _plt()
    mean = doc["mean"]
    kappa = doc.get("settings", {}).get("kappa", 1.0)  # a file from before sweeps ran one kappa
    cols = doc.get("columns") or {m: {"method": m, "kappa": None if m in UNSTEERED else kappa} for m in mean}
    lines: dict[str, list[tuple[float, float, float | None]]] = {}
    for name, col in cols.items():
        ppl = mean[name]["cloud_ppl"]
        if ppl is not None:
            lines.setdefault(col["method"] if col["kappa"] is not None else name, []).append(
                (ppl, 100 * mean[name]["match"], col["kappa"]))
    if not lines:
        raise ValueError("no column has a cloud perplexity to plot")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    refs = itertools.cycle([("*", "black"), ("P", "dimgray")])
    for label, pts in lines.items():
        pts.sort(key=lambda p: (p[2] is None, p[2] or 0.0))
        xs, ys, ks = zip(*pts, strict=True)
        if ks[0] is None:  # an unsteered reference: grey markers, so no method's colour is taken
            marker, color = next(refs)
            ax.scatter(xs, ys, marker=marker, s=120, color=color, zorder=3, label=label)
            continue
        ax.plot(xs, ys, marker="o", label=label)
        for x, y, k in pts:
            ax.annotate(f"κ {k:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("cloud perplexity of the output (fluency; lower is better)")
    ax.set_ylabel("target match, % of outputs")
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    settings = doc.get("settings", {})
    ax.set_title(title or f"{settings.get('strategy', '')} personal steering: match vs fluency".strip(), fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    _plt().close(fig)
    log.info("wrote %s", p)
    return p


def ppl_markdown(strategies: dict[str, dict], digits: int = 2) -> str:
    """A markdown table: users as rows, strategies as columns, plus the mean; the best per row in bold."""
    names = list(strategies)
    users = list(next(iter(strategies.values()))["per_user_ppl"])
    lines = ["| user | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for user in [*users, "mean"]:
        vals = [s["mean_ppl"] if user == "mean" else s["per_user_ppl"][user] for s in strategies.values()]
        best = min(vals)
        cells = [f"**{v:.{digits}f}**" if v == best else f"{v:.{digits}f}" for v in vals]
        lines.append(f"| {user} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
