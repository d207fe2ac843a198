"""`pocketlm eval-personal`: the personal models of a CoMiGS run steer a cloud model; scored per user."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import typer
from rich.table import Table

from ..data import load_corpus
from ..data.splits import split_corpus
from ..errors import PocketLMError
from ..eval.personal_eval import (
    FUSIONS,
    PERSONAL_METHODS,
    UserTarget,
    check_kappas,
    evaluate_personal,
    language_target,
)
from ..eval.personal_metrics import LANGUAGE_NAMES, UnigramUsers, language_of
from ..eval.report import plot_personal_tradeoff
from ..jsonfile import write_json
from ..models import load_model
from ..moe.personal import load_personal
from ..steer.cloud.in_process import HFCloudBackend
from ..steer.engine import SteerEngine
from .app import app, console
from .bench_cmds import hardware
from .options import DeviceOpt, DtypeOpt, JsonOutOpt, MaxNewTokensOpt, ThreadsOpt, float_list

DEFAULT_PROMPTS = ("Write two sentences about how to spend a free Sunday.",
                   "Give me one piece of advice for a difficult day.",
                   "Describe a good meal in two sentences.")


def run_config(run: Path) -> dict:
    path = run / "history.json"
    if not path.is_file():
        raise PocketLMError(f"{run} is not a training run (no history.json)")
    try:
        return json.loads(path.read_text())["config"]
    except (json.JSONDecodeError, KeyError) as e:
        raise PocketLMError(f"{path} is not a pocketlm history file ({e})") from None


def user_targets(cfg: dict, users: list[str]):
    """Language users (fortunes) are matched by a stop-word language identifier; any other users (AG News
    topics) by the nearest per-user unigram model of the users' training splits."""
    if all(u in LANGUAGE_NAMES for u in users):
        targets = [language_target(u, LANGUAGE_NAMES[u]) for u in users]
        return targets, (lambda text, user: language_of(text) == user), "language"
    splits = split_corpus(load_corpus(cfg["corpus"], fmt=cfg.get("corpus_format")), seed=cfg.get("seed", 0),
                          max_chars=cfg.get("max_chars"))
    unigrams = UnigramUsers({u: "\n".join(splits[u].train) for u in users if u in splits})
    targets = [UserTarget(u, f"I care most about {u} news and write about {u}.", f"Write it as a {u} news item.")
               for u in users]
    return targets, (lambda text, user: unigrams.nearest(text) == user), "nearest_unigram_user"


@app.command("eval-personal")
def eval_personal_cmd(
    run: Path = typer.Option(..., help="A training run folder (runs/<config>/<strategy>) with users/<user>/."),
    cloud: str = typer.Option(None, help="Cloud model spec (default: the run's base model)."),
    prompts: Path = typer.Option(None, help="Prompt file, one neutral prompt per line (default: 3 built-in)."),
    methods: str = typer.Option(",".join(PERSONAL_METHODS), help=f"Comma list of {', '.join(PERSONAL_METHODS)}."),
    kappa: str = typer.Option("1", help="Steering strength of the steered methods; a comma list (1,1.5,2) sweeps "
                              "them in one batched run, columns named method@kappa."),
    fusion: str = typer.Option("closed_form", help="How the device signals steer: closed_form | plausible "
                               "(only tokens the cloud finds plausible: its fluency guard) | ada_costeer (steer "
                               "until the cloud is confident 3 tokens in a row, then the cloud alone)."),
    max_new_tokens: MaxNewTokensOpt = 48,
    device: DeviceOpt = None,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = None,
    json_out: JsonOutOpt = None,
    plot: Path = typer.Option(None, help="Write a PNG of target match vs cloud perplexity here (one line per "
                              "method through its kappas)."),
) -> None:
    """Generate for every user of a run with every method; report target match, cloud perplexity, distinct-2."""
    ms = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in ms if m not in PERSONAL_METHODS]
    if bad or not ms:
        raise PocketLMError(f"unknown method(s) {', '.join(bad) or '(none)'}; choose from {', '.join(PERSONAL_METHODS)}")
    kappas = check_kappas(float_list(kappa, "--kappa"))
    if fusion not in FUSIONS:
        raise PocketLMError(f"unknown fusion {fusion!r}; choose from {', '.join(FUSIONS)}")
    if threads:
        torch.set_num_threads(threads)
    cfg = run_config(run)
    texts = [ln.strip() for ln in prompts.read_text(encoding="utf-8").splitlines() if ln.strip()] if prompts else list(
        DEFAULT_PROMPTS)
    if prompts and not texts:
        raise PocketLMError(f"{prompts} has no prompts")
    users_dir = run / "users"
    users = sorted(p.name for p in users_dir.iterdir() if p.is_dir()) if users_dir.is_dir() else []
    if not users:
        raise PocketLMError(f"{run} has no users/<user>/ adapter folders (a 'pretrained' run has none: its "
                            "weights signal is zero by construction)")
    base, tok = load_model(cfg["model"], device=device, dtype=dtype)
    cloud_model, cloud_tok = (base, tok) if cloud in (None, cfg["model"]) else load_model(cloud, device=device, dtype=dtype)
    backend = HFCloudBackend(cloud_model, cloud_tok)
    targets, match, kind = user_targets(cfg, users)

    def engine(user: str) -> SteerEngine:
        return SteerEngine(backend, cloud_tok, load_personal(base, users_dir / user), tok)

    doc = evaluate_personal(engine, targets, texts, match, cloud_model, methods=ms, kappas=kappas,
                            max_new_tokens=max_new_tokens, fusion=fusion)
    doc["settings"] = {"run": str(run), "strategy": cfg.get("strategy", run.name), "model": cfg["model"],
                       "cloud": cloud or cfg["model"], "kappa": kappas[0] if len(kappas) == 1 else list(kappas),
                       "fusion": fusion, "max_new_tokens": max_new_tokens,
                       "prompts": texts, "match": kind, "hardware": hardware(), "torch": torch.__version__}
    table = Table(title=f"eval-personal {run}: target match / cloud ppl / distinct-2 ({kind})")
    table.add_column("user")
    for m in doc["columns"]:
        table.add_column(m, justify="right")
    for user, row in [*doc["users"].items(), ("mean", doc["mean"])]:
        table.add_row(user, *[f"{100 * row[m]['match']:.0f}% / {row[m]['cloud_ppl'] or float('nan'):.1f} / "
                              f"{row[m]['distinct2']:.2f}" for m in doc["columns"]])
    console.print(table)
    if json_out:
        write_json(doc, json_out, indent=1, ensure_ascii=False)
    if plot:
        try:
            console.print(f"match vs fluency plot: {plot_personal_tradeoff(doc, plot)}")
        except ValueError as e:  # every output empty: nothing to place on the perplexity axis (the JSON is kept)
            raise PocketLMError(f"no plot: {e}") from None
