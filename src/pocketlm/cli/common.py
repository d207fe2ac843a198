"""Helpers several command modules share, in one place so that no command module imports another: the machine
line every benchmark records, the thread setting, printing a result, and the per-user tables and plots of
training runs."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from rich.table import Table

from ..errors import PocketLMError
from ..eval.report import plot_ppl_curves, plot_routing
from ..jsonfile import write_json
from .app import console


def hardware() -> str:
    """The GPU's name, else the CPU and its torch threads: recorded beside every timing."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def machine() -> dict:
    """`hardware` and the torch version, as result JSON records them."""
    return {"hardware": hardware(), "torch": torch.__version__}


def set_threads(n: int | None) -> None:
    """`--threads N` (None: torch's default)."""
    if n is not None:
        if n < 1:
            raise PocketLMError(f"--threads must be >= 1, got {n}")
        torch.set_num_threads(n)


def require_serve_extra() -> None:
    """The step server and its benchmarks need the `serve` extra: say so in one line instead of an ImportError."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        import websockets  # noqa: F401
    except ImportError as e:
        raise PocketLMError(f"the step server needs the serve extra: pip install 'pocketlm[serve]' ({e.name})") from None


def show(table: Table, doc: dict, json_out: Path | None, **json_format) -> None:
    """Print a command's table; with --json, write the whole result it summarises."""
    console.print(table)
    if json_out:
        write_json(doc, json_out, **json_format)


def summary_table(summary: dict[str, dict[str, int]], title: str) -> Table:
    """Tokens per user per split."""
    table = Table(title=title)
    table.add_column("user")
    for split in ("train", "val", "test"):
        table.add_column(f"{split} tokens", justify="right")
    for user, row in summary.items():
        table.add_row(user, *(f"{row[s]:,}" for s in ("train", "val", "test")))
    return table


def compare_table(strategies: dict[str, dict], title: str) -> Table:
    """Per-user test perplexity, one column per strategy, the best of each row in bold."""
    table = Table(title=title)
    table.add_column("user")
    for name in strategies:
        table.add_column(name, justify="right")
    users = list(next(iter(strategies.values()))["per_user_ppl"])
    for user in [*users, "mean"]:
        vals = [s["mean_ppl"] if user == "mean" else s["per_user_ppl"][user] for s in strategies.values()]
        best = min(vals)
        cells = [f"[bold green]{v:.2f}[/]" if v == best else f"{v:.2f}" for v in vals]
        table.add_row(f"[bold]{user}[/]" if user == "mean" else user, *cells)
    return table


def write_plots(histories: dict[str, list[dict]], out_dir: Path, title: str) -> list[Path]:
    """ppl-vs-round for all strategies; a routing heatmap for each strategy with a router."""
    paths = [plot_ppl_curves(histories, out_dir / "ppl_vs_round.png", title)]
    for name, hist in histories.items():
        routing = next((e["routing"] for e in reversed(hist) if e.get("routing")), None)
        if routing:
            paths.append(plot_routing(routing, out_dir / f"routing_{name}.png", f"{title}: {name}"))
    return paths
