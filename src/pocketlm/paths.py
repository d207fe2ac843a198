"""Where pocketlm keeps converted models and corpora: `$POCKETLM_HOME`, else `~/.cache/pocketlm`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    root = Path(os.environ.get("POCKETLM_HOME") or Path.home() / ".cache" / "pocketlm").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
