"""`pocketlm` command line. Each module registers its commands on the shared typer app."""

from . import bench_cmds, data_cmds, demo, fl_cmds, steer_cmds, train_cmds  # noqa: F401  (registration side effects)
from .app import app, main

__all__ = ["app", "main"]
