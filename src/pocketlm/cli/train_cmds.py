"""`pocketlm train` (one strategy) and `pocketlm compare` (several, one table + JSON + PNGs)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..collab import Workspace, compare, get_strategy, load_config, run_strategy
from ..data import token_summary
from ..jsonfile import write_json
from .app import app, console
from .common import compare_table, summary_table, write_plots
from .options import str_list

CONFIG_HELP = "TOML config (e.g. configs/fortunes-id.toml); defaults are the official hyper-parameters."
SET_HELP = "Override any config key, e.g. --set rounds=2 --set experts=2,3,3,1 (repeatable)."


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
    names = str_list(strategies, "--strategies")
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
