"""`pocketlm device status | steer`: the commands a person runs on a device that trains with Flower.

What a device learned (`pocketlm fl supernode --user NOTES --state DIR`) is what it steers with: the state
directory holds the device's private experts and router, its own shared parts and the federation's final average
(collab.flower.state), and `--adapters DIR` / `device steer --state DIR` load them as the personal model. The
profile (a text file that may start with `protect:` front matter) stays on the device, like the notes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import typer
from rich.table import Table

from ..collab.flower.state import describe
from ..errors import PocketLMError
from ..jsonfile import write_json
from ..steer import METHODS
from .app import app
from .common import show
from .groups import (
    DownlinkOptions,
    EngineOptions,
    GuardOptions,
    PersonalOptions,
    SamplingOptions,
    group,
    with_groups,
)
from .options import JsonOutOpt

log = logging.getLogger(__name__)
device_app = typer.Typer(help="A device's personal model: what it trained with Flower, steering a cloud.",
                         no_args_is_help=True)
app.add_typer(device_app, name="device")

PROFILE = "profile.txt"      # the device's default profile file, inside its state directory

StateArg = typer.Argument(..., help="The device's state directory (`pocketlm fl supernode --state DIR`).")


@device_app.command("status")
def status_cmd(state: Path = StateArg, json_out: JsonOutOpt = None) -> None:
    """Who the device is, its model, how far it trained, where its shared parts come from, its size on disk."""
    doc = describe(state)
    table = Table(title=f"device state {doc['directory']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    shared = (f"global average of round {doc['shared_from_round']}" if doc["shared_from_round"] is not None
              else "the device's own (no newer global average received)")
    rows = [("user", doc["user"]), ("model", doc["model"]), ("strategy", doc["strategy"]),
            ("experts", f"{doc['experts']} (rank {doc['rank']})"),
            ("rounds done", f"{doc['rounds_done']} ({doc['step']} local steps; last server round "
                            f"{doc['last_server_round']})"),
            ("shared parts", f"{shared}; {doc['tensors']['shared']} tensors"),
            ("private parts", f"{doc['tensors']['private']} tensors (never sent)"),
            ("on disk", f"{doc['bytes'] / 1e6:.2f} MB in {len(doc['files'])} files")]
    for k, v in rows:
        table.add_row(k, str(v))
    show(table, doc, json_out)


@device_app.command("steer")
@with_groups
def steer_cmd(
    prompt: str = typer.Argument(..., help="The public prompt (the only text the cloud sees)."),
    state: Path = typer.Option(..., help="The device's state directory: its personal model."),
    profile: Path = typer.Option(None, help=f"The private profile (default: {PROFILE} in the state directory, if "
                                 "there); front matter may carry `protect: w1, w2`."),
    method: str = typer.Option("closed_form", help=f"One of: {', '.join(METHODS)} (name@kappa allowed)."),
    kappa: float = typer.Option(None, help="Steering strength for closed_form/plausible/adaptive/ada_costeer."),
    json_out: JsonOutOpt = None,
    *,
    engine: EngineOptions = group(local=typer.Option(
        None, help="Device base model spec (default: the model the state was trained on).")),
    personal: PersonalOptions = group("adapters"),
    downlink: DownlinkOptions,
    decode: SamplingOptions,
    guards: GuardOptions,
) -> None:
    """`steer` with the device's personal model and profile: private by default (leak guard unless --no-guard)."""
    from .steer_cmds import steer_once

    info = describe(state)
    if profile is None and (state / PROFILE).is_file():
        profile = state / PROFILE
    if profile is not None and not profile.is_file():
        raise PocketLMError(f"profile {profile} not found")
    engine = dataclasses.replace(engine, local=engine.local or info["model"])
    personal = dataclasses.replace(personal, adapters=state)
    log.info("device %s (%s): shared parts from %s", info["user"], engine.local,
             f"round {info['shared_from_round']}" if info["shared_from_round"] is not None else "its own training")
    gen, gs = steer_once(prompt, profile, method, kappa, engine=engine, personal=personal, downlink=downlink,
                         decode=decode, guards=guards)
    if json_out:
        write_json({"prompt": prompt, "method": gen.method, "text": gen.text, "token_ids": gen.token_ids,
                    "finish": gen.finish, "guards": [g.name for g in gs], "guard_rejections": gen.guard_rejections,
                    "signal": personal.signal, "cloud": engine.cloud, "local": engine.local, "device": info},
                   json_out, indent=1, ensure_ascii=False)
