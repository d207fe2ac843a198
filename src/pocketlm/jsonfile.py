"""Writing result JSON files: every command and long run writes its results through one function."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def strict(obj):
    """A copy of `obj` in which non-finite floats (NaN, +-inf) are None: bare `NaN` / `Infinity` tokens are not
    JSON, and strict readers (browsers, jq, most languages' parsers) reject the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


def write_json(doc: dict, path: str | Path, *, indent: int = 2, ensure_ascii: bool = True) -> None:
    """Write `doc` as strict JSON to `path` (parents created) through `PATH.partial` + rename: a run killed
    mid-write, such as eval-steer rewriting its file after every example, leaves the previous complete file,
    never half of one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".partial")
    tmp.write_text(json.dumps(strict(doc), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False),
                   encoding="utf-8")
    os.replace(tmp, p)
