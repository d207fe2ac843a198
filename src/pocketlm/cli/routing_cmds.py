"""`pocketlm routing RUN` (token-level routing of a finished run, eval.routing) and `pocketlm seeds FILES` (results
over seeds, eval.seeds): what the CoMiGS tables can claim."""

from __future__ import annotations

from pathlib import Path

import typer

from ..eval.routing import analyze_run, plot_routing_buckets, routing_table
from ..jsonfile import write_json
from .app import app, console


@app.command("routing")
def routing_cmd(
    run: Path = typer.Argument(..., help="A run folder of `pocketlm train`/`compare` (history.json + users/)."),
    out: Path = typer.Option(None, "--out", "-o", help="Folder for routing.json and routing_tokens.png "
                                                       "(default: the run folder)."),
    max_tokens: int = typer.Option(None, help="Analyse at most this many test tokens per user."),
    per_layer: bool = typer.Option(True, help="One table row per layer (else the per-user means only)."),
    threads: int = typer.Option(None, help="torch threads (default: torch's)."),
    signal: bool = typer.Option(False, help="Also what the validation loss asks of the gates per bucket (the "
                                            "token-level signal a router trained on it can follow)."),
) -> None:
    """Per user and layer: the gate weight on the specialist for held-out tokens, by how user-specific they are."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    doc = analyze_run(run, max_tokens=max_tokens, signal=signal)
    console.print(routing_table(doc, per_layer=per_layer))
    console.print(f"[dim]{doc['definition']}[/]")
    if signal:
        from ..eval.routing_signal import signal_table

        console.print(signal_table(doc))
    folder = out or run
    write_json(doc, folder / "routing.json")
    png = plot_routing_buckets(doc, folder / "routing_tokens.png")
    console.print(f"json: {folder / 'routing.json'}; plot: {png}")


@app.command("seeds")
def seeds_cmd(
    files: list[Path] = typer.Argument(..., help="`pocketlm compare --json` files, any mix of seeds and strategies."),
    json_out: Path = typer.Option(None, "--json", help="Write the summary here."),
    plot: Path = typer.Option(None, help="Write a PNG here: per scenario, each strategy's per-seed perplexity "
                              "relative to that seed's best."),
) -> None:
    """Results over seeds: per scenario and strategy the mean test perplexity per seed (mean ± std), which
    orderings hold in every seed, and 1G1S / min(2G, 2S) per seed."""
    from ..eval.seeds import plot_seeds, read_results, seeds_tables, summarize

    doc = summarize(read_results(files))
    for item in seeds_tables(doc):
        console.print(item)
    if json_out:
        write_json(doc, json_out)
        console.print(f"json: {json_out}")
    if plot:
        console.print(f"plot: {plot_seeds(doc, plot)}")
