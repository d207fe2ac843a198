"""`pocketlm demo`: the main job on the embedded defaults (SmolLM2-135M + multilingual fortunes users)."""

from __future__ import annotations

import time

import typer

from ..data import build_scenario, load_corpus, token_summary
from ..eval import per_user_perplexity
from ..models import load_model
from .app import app, console
from .data_cmds import ppl_table, summary_table


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("smollm2-135m", help="Model spec."),
    corpus: str = typer.Option("fortunes:en,de,es,it", help="Corpus spec: 4 language users by default."),
    max_chars: int = typer.Option(60_000, help="Text per user (characters) kept for the demo."),
    block_len: int = typer.Option(128),
    device: str = typer.Option(None),
    seed: int = typer.Option(0),
) -> None:
    """Per-user perplexity of the pretrained model on 4 users writing in 4 languages."""
    t0 = time.time()
    m, tok = load_model(model, device=device)
    console.print(f"[bold]model[/] {model}: {sum(p.numel() for p in m.parameters()) / 1e6:.1f}M parameters, "
                  f"loaded in {time.time() - t0:.1f}s")
    data = build_scenario(load_corpus(corpus), tok, scenario="id", seed=seed, max_chars=max_chars)
    console.print(summary_table(token_summary(data), f"users of {corpus} (in-distribution splits)"))
    ppl = per_user_perplexity(m, data, split="test", block_len=block_len, pad_id=tok.pad_token_id or 0)
    console.print(ppl_table(ppl, f"pretrained {model}: test perplexity per user"))
    console.print(f"done in {time.time() - t0:.0f}s")
