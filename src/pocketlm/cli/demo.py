"""`pocketlm demo`: the main job on the embedded defaults (SmolLM2-135M + multilingual fortunes users).

1. the users and their pretrained per-user perplexity;
2. CoMiGS (`1g1s`) against `local` and `fedavg`, trained briefly on CPU, as one per-user table + PNGs;
3. one CoSteer generation beside the unsteered one (SmolLM2-135M plays both cloud and device here: the cloud
   side still never sees the private context, only the chosen token ids).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..collab import Workspace, compare, load_config
from ..data import token_summary
from ..jsonfile import write_json
from .app import app, console
from .common import compare_table, summary_table, write_plots
from .options import DeviceOpt, MaxCopyOpt, str_list

DEMO_CONTEXT = ("I am Giulia, a retired sailor from Genoa. I always answer in a cheerful tone, I love the sea, "
                "boats and seafood, and I end every message with a short proverb about the sea.")
DEMO_PROMPT = "Write two sentences about how to spend a free Sunday."


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("smollm2-135m", help="Model spec."),
    corpus: str = typer.Option("fortunes:en,de,es,it", help="Corpus spec: 4 language users by default."),
    strategies: str = typer.Option("1g1s,local,fedavg", help="Strategies to train and compare."),
    rounds: int = typer.Option(4),
    local_steps: int = typer.Option(4),
    batch_size: int = typer.Option(4),
    seq_len: int = typer.Option(128),
    max_chars: int = typer.Option(60_000, help="Text per user (characters) kept for the demo."),
    out: Path = typer.Option(Path("runs/demo"), help="Where results, adapters and PNGs go."),
    steer: bool = typer.Option(True, help="End with a steered vs plain generation."),
    device: DeviceOpt = None,
    seed: int = typer.Option(42),
    max_copy: MaxCopyOpt = 4,
    personal_kappa: float = typer.Option(1.0, help="Steering strength of the personal-model demo (signal both)."),
) -> None:
    """Train CoMiGS vs local vs FedAvg briefly on 4 users writing in 4 languages; then steer one answer."""
    t0 = time.time()
    cfg = load_config(None, {
        "model": model, "corpus": corpus, "scenario": "id", "max_chars": max_chars, "rounds": rounds,
        "local_steps": local_steps, "batch_size": batch_size, "seq_len": seq_len, "router_every": local_steps, "router_steps": 2,
        "eval_every": rounds, "seed": seed, "device": device, "out_dir": str(out / "{strategy}"),
    })
    names = ["pretrained", *str_list(strategies, "--strategies")]
    _train_demo(cfg, names, out)
    if steer:
        _steer_demo(model, device, max_copy)
        if "1g1s" in names:
            _personal_demo(model, out / "1g1s", device, personal_kappa)
    console.print(f"done in {time.time() - t0:.0f}s")


def _train_demo(cfg, names: list[str], out: Path) -> None:
    """The users, then every strategy trained briefly: one per-user perplexity table, compare.json and PNGs."""
    ws = Workspace.load(cfg)
    n_params = sum(p.numel() for p in ws.base.parameters()) / 1e6
    console.print(f"[bold]model[/] {cfg.model}: {n_params:.1f}M parameters (frozen; users train LoRA experts)")
    console.print(summary_table(token_summary(ws.data), f"users of {cfg.corpus} (in-distribution splits)"))
    console.print(f"training {', '.join(names[1:])}: {cfg.rounds} rounds x {cfg.local_steps} steps of "
                  f"{cfg.batch_size} x {cfg.seq_len} tokens per user")
    doc = compare(ws, names)
    write_json(doc, out / "compare.json")
    console.print(compare_table(doc["strategies"], "test perplexity per user (lower is better)"))
    for p in write_plots(doc["histories"], out, "demo: fortunes users"):
        console.print(f"plot: {p}")


def _steer_demo(model: str, device: str | None, max_copy: int | None) -> None:
    from ..steer.fusion.leak_guard import private_by_default
    from ..steer.fusion.leakage import leak_report

    console.print(f"\n[bold]CoSteer[/]: {model} plays the cloud (sees only the prompt) and the device "
                  "(also sees the private context)")
    console.print(f"[dim]private context (stays on the device):[/] {DEMO_CONTEXT}")
    console.print(f"[dim]prompt (goes to the cloud):[/] {DEMO_PROMPT}")
    plain, steered = steered_vs_plain(model, model, DEMO_CONTEXT, DEMO_PROMPT, max_new_tokens=60, device=device,
                                      guards=private_by_default(max_copy))
    console.print(f"[bold]cloud alone:[/] {plain.strip()}")
    guard = f"leak guard: at most {max_copy or 8} words copied from the context, none of its names"
    console.print(f"[bold]steered[/] ({guard}): {steered.strip()}")
    leak = leak_report(steered, DEMO_CONTEXT, DEMO_PROMPT)
    console.print(f"[dim]what reached the cloud: longest span copied from the private context "
                  f"{leak['longest_copy_words']} words; context-only words {', '.join(leak['context_words']) or 'none'}[/]")


def steered_vs_plain(cloud_spec: str, local_spec: str, context: str, prompt: str, max_new_tokens: int = 48,
                     device: str | None = None, method: str = "closed_form", guards=()) -> tuple[str, str]:
    """Return (plain cloud text, steered text) for `prompt`, greedy; the same model may be cloud and device.
    `guards` (the demo: the default leak guard) apply to the steered row. The cloud only receives chat(prompt) token ids."""
    from ..steer import SteerRequest, get_method, load_engine

    engine = load_engine(cloud_spec, local_spec, device=device)
    req = SteerRequest.with_context(prompt, context)
    plain, steered = engine.generate([req, req], [get_method("cloud"), get_method(method).with_guards(*guards)],
                                     max_new_tokens=max_new_tokens)
    return plain.text, steered.text


PERSONAL_PROMPT = "Write two sentences about how to spend a free Sunday."


def _personal_demo(model: str, run: Path, device: str | None, kappa: float) -> None:
    """The cloud alone, then steered by the German and the Italian user's personal models (signal `both`:
    log p_personal(.|profile, x) - log p_base(.|x); the one-sentence profile stays on the device, only token ids
    reach the cloud). On the demo's schedule `both` at kappa 1 matched every user's language (docs/results.md);
    the adapters alone (`weights`) do not yet."""
    from ..eval.personal_eval import language_target
    from ..eval.personal_metrics import LANGUAGE_NAMES, language_of
    from ..eval.personal_runs import PersonalEngines
    from ..steer import SteerRequest, get_method
    from ..steer.fusion.leak_guard import private_by_default

    users = [u for u in ("de", "it") if (run / "users" / u).is_dir()]
    if not users:
        return
    console.print(f"\n[bold]Personal steering[/]: each user's CoMiGS model from this run ({run}) steers the cloud "
                  "with its adapters and a private one-sentence profile; the cloud sees only the prompt")
    console.print(f"[dim]prompt (goes to the cloud):[/] {PERSONAL_PROMPT}")
    engines = PersonalEngines.load(model, run / "users", device=device)
    steer = get_method(f"closed_form@{kappa:g}").with_signal("both").with_guards(*private_by_default())
    for i, user in enumerate(users):
        lang = LANGUAGE_NAMES[user]
        req = SteerRequest.with_context(PERSONAL_PROMPT, language_target(user, lang).profile)
        methods = [get_method("cloud"), steer] if i == 0 else [steer]
        gens = engines(user).generate([req] * len(methods), methods, max_new_tokens=48)
        if i == 0:
            console.print(f"[bold]cloud alone:[/] {gens[0].text.strip()}  [dim](language: {language_of(gens[0].text)})[/]")
        text = gens[-1].text.strip()
        console.print(f"[bold]steered by the {lang} user's model:[/] {text}  [dim](language: {language_of(text)})[/]")
