"""`pocketlm train` (one strategy) and `pocketlm compare` (several, one table + JSON + PNGs)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..collab import Workspace, compare, get_strategy, load_config, run_strategy
from ..data import token_summary
from ..eval.report import plot_ppl_curves, plot_routing
from ..jsonfile import write_json
from .app import app, console
from .data_cmds import summary_table

CONFIG_HELP = "TOML config (e.g. configs/fortunes-id.toml); defaults are the official hyper-parameters."
SET_HELP = "Override any config key, e.g. --set rounds=2 --set experts=2,3,3,1 (repeatable)."


def compare_table(strategies: dict[str, dict], title: str) -> Table:
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


@app.command("train")
def train_cmd(
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    strategy: str = typer.Option(None, help="Strategy (default: the config's): 1g1s, 2g, 2s, local, fedavg, "
                                            "centralized, pretrained."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last round's checkpoint in out_dir."),
    plots: bool = typer.Option(True, help="Write PNG plots next to the results."),
) -> None:
    """Train one strategy over simulated users; per-user test perplexity each round; a checkpoint each round."""
    cfg = load_config(config, overrides + ([f"strategy={strategy}"] if strategy else []))
    ws = Workspace.load(cfg)
    console.print(summary_table(token_summary(ws.data), f"users ({cfg.scenario} scenario)"))
    sim = run_strategy(ws, cfg.strategy, resume=resume)
    final = sim.final()
    console.print(compare_table({cfg.strategy: final}, f"{cfg.strategy}: test perplexity after round {sim.round}"))
    if plots:
        for p in write_plots({cfg.strategy: sim.history}, sim.out, f"{cfg.strategy} ({cfg.scenario})"):
            console.print(f"plot: {p}")
    console.print(f"results: {sim.out / 'history.json'}; adapters: {sim.out / 'users'}")


@app.command("compare")
def compare_cmd(
    config: Path = typer.Option(None, "--config", "-c", help=CONFIG_HELP),
    strategies: str = typer.Option("1g1s,2g,2s,local,fedavg", help="Comma-separated strategies."),
    overrides: list[str] = typer.Option([], "--set", help=SET_HELP),
    json_out: Path = typer.Option(None, "--json", help="Write the comparison JSON here."),
    plot_dir: Path = typer.Option(None, "--plots", help="Directory for PNGs (default: next to --json)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished strategies / continue killed ones."),
) -> None:
    """Run several strategies on the same base and splits; print the per-user perplexity table."""
    cfg = load_config(config, overrides)
    names = [s.strip() for s in strategies.split(",") if s.strip()]
    for name in names:  # fail before hours of training, not in the middle
        get_strategy(name)
    ws = Workspace.load(cfg)
    console.print(summary_table(token_summary(ws.data), f"users ({cfg.scenario} scenario)"))
    doc = compare(ws, names, resume=resume)
    console.print(compare_table(doc["strategies"], f"test perplexity, {cfg.corpus} ({cfg.scenario})"))
    if json_out:
        write_json(doc, json_out)
        console.print(f"json: {json_out}")
    out = plot_dir or (json_out.parent if json_out else None)
    if out:
        for p in write_plots(doc["histories"], Path(out), f"{Path(cfg.corpus).name} ({cfg.scenario})"):
            console.print(f"plot: {p}")
