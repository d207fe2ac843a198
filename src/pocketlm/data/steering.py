"""Steering evaluation rows: the CoGenesis format and the LongLaMP format (CoSteer's released files).

CoGenesis: `input` (public, to the cloud), `personalized_input` (profile + writing history + task; stays on
the device), `output` (reference). LongLaMP: `input`, `output`, and the user's history as `top_5` (already
retrieved) or `profile` (items carrying `bge_score`; the top 5 by score are used, as the official code's
retrieval did). The device prompt is built like the official adapter: heading, numbered pairs,
"Now it's your turn", query.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

# (heading, (label, key), (label, key)) per LongLaMP task, identified by the keys of the history items.
LONGLAMP_FORMATS = {
    "abstract": ("The following are five titles with their abstracts.", ("Title", "title"), ("Abstract", "abstract")),
    "review": ("The following are product descriptions with their user reviews.",
               ("Product", "description"), ("Review", "reviewText")),
    "writing": ("The following are reddit post summaries with their content.",
                ("Summary", "summary"), ("Content", "content")),
}
TOP_K = 5


@dataclass(frozen=True)
class SteerExample:
    id: str
    query: str      # public: the cloud sees this
    private: str    # device only: context + query, as one user message
    reference: str
    format: str     # "cogenesis" | "longlamp-abstract" | ...


def longlamp_prompt(query: str, history: list[dict], where: str = "row") -> tuple[str, str]:
    """(device prompt, task name) from the user's history items, in the official layout."""
    if not history:
        raise DataError(f"{where}: empty LongLaMP profile")
    for task, (heading, (l1, k1), (l2, k2)) in LONGLAMP_FORMATS.items():
        if all(isinstance(h, dict) and k1 in h and k2 in h for h in history):
            sections = [heading]
            for i, item in enumerate(history[:TOP_K], start=1):
                sections.append(f"{l1}[{i}]: {item[k1]}\n{l2}[{i}]: {item[k2]}\n")
            sections.extend(("Now it's your turn\n", query))
            return "\n".join(sections), task
    keys = sorted(history[0]) if isinstance(history[0], dict) else type(history[0]).__name__
    raise DataError(f"{where}: LongLaMP history items have unknown fields {keys}; expected one of "
                    + ", ".join(f"{k1}+{k2}" for _, (_, k1), (_, k2) in LONGLAMP_FORMATS.values()))


def _str(row: dict, key: str, where: str) -> str:
    v = row.get(key)
    if not isinstance(v, str) or not v.strip():
        raise DataError(f"{where}: field {key!r} must be a non-empty string")
    return v


def parse_row(row: dict, where: str, index: int) -> SteerExample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rid = str(row.get("id", row.get("tid", row.get("reviewerId", index))))
    query, reference = _str(row, "input", where), _str(row, "output", where)
    if "personalized_input" in row:
        return SteerExample(rid, query, _str(row, "personalized_input", where), reference, "cogenesis")
    if "top_5" in row or "profile" in row:
        history = row.get("top_5")
        if history is None:
            profile = row["profile"]
            if not isinstance(profile, list):
                raise DataError(f"{where}: 'profile' must be a list")
            if not all(isinstance(p, dict) and isinstance(p.get("bge_score"), int | float) for p in profile):
                raise DataError(f"{where}: every 'profile' item needs a numeric 'bge_score'")
            history = sorted(profile, key=lambda p: -p["bge_score"])[:TOP_K]
        if not isinstance(history, list):
            raise DataError(f"{where}: 'top_5' must be a list")
        private, task = longlamp_prompt(query, history, where)
        return SteerExample(rid, query, private, reference, f"longlamp-{task}")
    raise DataError(f"{where}: row has neither 'personalized_input' (CoGenesis) nor 'profile'/'top_5' (LongLaMP)")


def load_steer_data(path: str | Path, limit: int | None = None, offset: int = 0) -> list[SteerExample]:
    """Read a jsonl file of CoGenesis or LongLaMP rows (skipping the first `offset`, keeping at most `limit`);
    malformed rows raise DataError with the line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"steering data file {path} not found")
    out: list[SteerExample] = []
    skipped = 0
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if skipped < offset:
                skipped += 1
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            out.append(parse_row(row, where, offset + len(out)))
            if limit is not None and len(out) >= limit:
                break
    if not out:
        raise DataError(f"{path} has no rows" + (f" after the first {offset}" if offset else ""))
    return out
