"""Writing result JSON files: every command and long run writes its results through one function."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(doc: dict, path: str | Path, *, indent: int = 2, ensure_ascii: bool = True) -> None:
    """Write `doc` to `path` (parents created) through `PATH.partial` + rename: a run killed mid-write, such as
    eval-steer rewriting its file after every example, leaves the previous complete file, never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".partial")
    tmp.write_text(json.dumps(doc, indent=indent, ensure_ascii=ensure_ascii), encoding="utf-8")
    os.replace(tmp, p)
