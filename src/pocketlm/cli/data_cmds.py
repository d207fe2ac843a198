"""`pocketlm data` (corpus summary), `pocketlm ppl` (per-user perplexity), `pocketlm prepare`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..data import build_scenario, load_corpus, token_summary
from ..eval import per_user_perplexity
from ..jsonfile import write_json
from ..models import load_model
from .app import app, console
from .common import summary_table
from .options import DeviceOpt, DtypeOpt


def ppl_table(ppl: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    table.add_column("user")
    table.add_column("perplexity", justify="right")
    for user, value in ppl.items():
        table.add_row(user, f"{value:.2f}")
    table.add_row("[bold]mean[/]", f"[bold]{sum(ppl.values()) / len(ppl):.2f}[/]")
    return table


@app.command("data")
def data_cmd(
    corpus: str = typer.Argument(..., help="fortunes[:en,de,...] | DIR (per-user folders or AG News) | FILE.jsonl | shakespeare input.txt"),
    fmt: str = typer.Option(None, help="folder | jsonl | shakespeare | agnews | fortunes (default: guessed)"),
    model: str = typer.Option("smollm2-135m", help="Model whose tokenizer counts the tokens."),
    scenario: str = typer.Option("id", help="id | ood"),
    max_chars: int = typer.Option(None, help="Cap the text per user (characters, after shuffling)."),
    seed: int = typer.Option(0),
) -> None:
    """Print tokens per user per split for a corpus."""
    _, tok = load_model(model, device="cpu")
    data = build_scenario(load_corpus(corpus, fmt=fmt), tok, scenario=scenario, seed=seed, max_chars=max_chars)
    console.print(summary_table(token_summary(data), f"{corpus} ({scenario})"))


@app.command("ppl")
def ppl_cmd(
    corpus: str = typer.Argument(..., help="Corpus spec, as for `pocketlm data`."),
    model: str = typer.Option("smollm2-135m", help="Model spec: built-in name, HF dir, .gguf, tiny-*."),
    fmt: str = typer.Option(None),
    scenario: str = typer.Option("id"),
    split: str = typer.Option("test"),
    max_chars: int = typer.Option(None),
    block_len: int = typer.Option(128),
    batch_size: int = typer.Option(8),
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    seed: int = typer.Option(0),
    json_out: Path = typer.Option(None, "--json", help="Write {user: ppl} here."),
) -> None:
    """Per-user perplexity of a model over each user's whole (deterministic) split."""
    m, tok = load_model(model, device=device, dtype=dtype)
    data = build_scenario(load_corpus(corpus, fmt=fmt), tok, scenario=scenario, seed=seed, max_chars=max_chars)
    ppl = per_user_perplexity(m, data, split=split, block_len=block_len, batch_size=batch_size,
                              pad_id=tok.pad_token_id or 0)
    console.print(ppl_table(ppl, f"{model} on {corpus} ({scenario}, {split})"))
    if json_out:
        write_json(ppl, json_out)


@app.command("prepare")
def prepare_cmd(
    model: str = typer.Option("smollm2-135m", help="Model to convert and cache."),
    corpus: str = typer.Option("fortunes", help="Built-in corpus to download and cache ('' for none)."),
) -> None:
    """Convert the default model and fetch the built-in corpus once, so later runs start in seconds."""
    load_model(model, device="cpu")
    console.print(f"model {model}: ready")
    if corpus:
        users = load_corpus(corpus)
        console.print(f"corpus {corpus}: {', '.join(f'{u} ({len(d):,} docs)' for u, d in users.items())}")
