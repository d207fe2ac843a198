"""The typer app every command module registers on; `main()` turns PocketLMError into a clean message."""

from __future__ import annotations

import logging
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import PocketLMError

app = typer.Typer(
    name="pocketlm",
    help="Private, personal language models that learn together (CoMiGS) and steer the cloud (CoSteer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks: print ratios against an in-run baseline and write JSON.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console(stderr=False)
err_console = Console(stderr=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main() -> None:
    try:
        app()
    except PocketLMError as e:
        # soft_wrap: never break a path across lines; escape: messages may contain [brackets]
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(2)
