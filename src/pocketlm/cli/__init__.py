"""`pocketlm` command line. Each module registers its commands on the shared typer app."""

from . import (  # noqa: F401  (registration side effects)
    bench_cmds,
    data_cmds,
    demo,
    device_cmds,
    fl_cmds,
    personal_cmds,
    routing_cmds,
    serve_cmds,
    spec_cmds,
    steer_cmds,
    train_cmds,
)
from .app import app, main

__all__ = ["app", "main"]
