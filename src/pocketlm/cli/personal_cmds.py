"""`pocketlm eval-personal`: the personal models of a CoMiGS run steer a cloud model; scored per user. Reading
the run and building its engines is eval/personal_runs.py; this module parses options and prints."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..errors import PocketLMError
from ..eval.personal_eval import FUSIONS, PERSONAL_METHODS, check_kappas, evaluate_personal
from ..eval.personal_runs import PersonalEngines, read_prompts, run_config, run_users, user_targets
from ..eval.report import plot_personal_tradeoff
from .app import app, console
from .common import machine, set_threads, show
from .groups import EngineOptions, group, with_groups
from .options import JsonOutOpt, MaxNewTokensOpt, choice_list, float_list


@app.command("eval-personal")
@with_groups
def eval_personal_cmd(
    run: Path = typer.Option(..., help="A training run folder (runs/<config>/<strategy>) with users/<user>/."),
    prompts: Path = typer.Option(None, help="Prompt file, one neutral prompt per line (default: 3 built-in)."),
    methods: str = typer.Option(",".join(PERSONAL_METHODS), help=f"Comma list of {', '.join(PERSONAL_METHODS)}."),
    kappa: str = typer.Option("1", help="Steering strength of the steered methods; a comma list (1,1.5,2) sweeps "
                              "them in one batched run, columns named method@kappa."),
    fusion: str = typer.Option("closed_form", help="How the device signals steer: closed_form | plausible "
                               "(only tokens the cloud finds plausible: its fluency guard) | ada_costeer (steer "
                               "until the cloud is confident 3 tokens in a row, then the cloud alone)."),
    max_new_tokens: MaxNewTokensOpt = 48,
    json_out: JsonOutOpt = None,
    plot: Path = typer.Option(None, help="Write a PNG of target match vs cloud perplexity here (one line per "
                              "method through its kappas)."),
    *,
    engine: EngineOptions = group(
        "local", "cloud_token", "cloud_logprobs", "cloud_prompt", "cloud_verify", "device_quantize",  # the device is the run's; the cloud in process
        cloud=typer.Option(None, help="Cloud model spec (default: the run's base model)."), overlap=False),
) -> None:
    """Generate for every user of a run with every method; report target match, cloud perplexity, distinct-2."""
    ms = choice_list(methods, "--methods", PERSONAL_METHODS, "method")
    kappas = check_kappas(float_list(kappa, "--kappa"))
    if fusion not in FUSIONS:
        raise PocketLMError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    set_threads(engine.threads)
    cfg = run_config(run)
    texts, users = read_prompts(prompts), run_users(run)
    engines = PersonalEngines.load(cfg["model"], run / "users", engine.cloud, device=engine.device,
                                   dtype=engine.dtype, **engine.decoding())
    targets, match, kind = user_targets(cfg, users)
    doc = evaluate_personal(engines, targets, texts, match, engines.cloud_model, methods=ms, kappas=kappas,
                            max_new_tokens=max_new_tokens, fusion=fusion)
    doc["settings"] = {"run": str(run), "strategy": cfg.get("strategy", run.name), "model": cfg["model"],
                       "cloud": engine.cloud or cfg["model"], "kappa": kappas[0] if len(kappas) == 1 else list(kappas),
                       "fusion": fusion, "max_new_tokens": max_new_tokens, "prompts": texts, "match": kind, **machine()}
    show(_table(doc, f"eval-personal {run}: target match / cloud ppl / distinct-2 ({kind})"), doc, json_out,
         indent=1, ensure_ascii=False)
    if plot:
        _plot(doc, plot)


def _table(doc: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("user")
    for m in doc["columns"]:
        table.add_column(m, justify="right")
    for user, row in [*doc["users"].items(), ("mean", doc["mean"])]:
        table.add_row(user, *[f"{100 * row[m]['match']:.0f}% / {row[m]['cloud_ppl'] or float('nan'):.1f} / "
                              f"{row[m]['distinct2']:.2f}" for m in doc["columns"]])
    return table


def _plot(doc: dict, path: Path) -> None:
    try:
        console.print(f"match vs fluency plot: {plot_personal_tradeoff(doc, path)}")
    except ValueError as e:  # every output empty: nothing to place on the perplexity axis (the JSON is kept)
        raise PocketLMError(f"no plot: {e}") from None
