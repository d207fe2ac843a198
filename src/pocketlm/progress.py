"""Progress bars for loops a person waits for (tqdm, quiet when not a terminal unless forced)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm


def progress(it: Iterable, *, desc: str | None = None, total: int | None = None, leave: bool = False):
    """Wrap an iterable in a tqdm bar; `POCKETLM_PROGRESS=0` silences it, `=1` forces it."""
    flag = os.environ.get("POCKETLM_PROGRESS")
    disable = flag == "0" or (flag != "1" and not sys.stderr.isatty())
    return tqdm(it, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True)
