"""`pocketlm` command line. Each module registers its commands on the shared typer app."""

from . import bench_cmds, data_cmds, demo  # noqa: F401  (registration side effects)
from . import train_cmds  # noqa: F401
from . import steer_cmds  # noqa: F401
from .app import app, main

__all__ = ["app", "main"]
