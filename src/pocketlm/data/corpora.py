"""Per-user text corpora: `{user: [document, ...]}` from folders, JSONL, Tiny Shakespeare, AG News, fortunes.

Every reader fails with a `DataError` that names the file and line, and never returns an empty user.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

from ..errors import DataError

log = logging.getLogger(__name__)

UserCorpus = dict[str, list[str]]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return path.read_text(encoding="latin-1")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e


def _check(corpus: UserCorpus, source: str) -> UserCorpus:
    if not corpus:
        raise DataError(f"{source}: no users found")
    for user, docs in corpus.items():
        if not docs:
            raise DataError(f"{source}: user {user!r} has no text")
    return corpus


def read_folder(root: str | Path) -> UserCorpus:
    """`ROOT/<user>/*.txt`: each file is one document of that user."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    corpus: UserCorpus = {}
    for user_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(user_dir.glob("*.txt"))
        docs = [t for f in files if (t := _read_text(f).strip())]
        if not docs:
            raise DataError(f"{root}: user {user_dir.name!r} has no non-empty .txt files")
        corpus[user_dir.name] = docs
    return _check(corpus, str(root))


def read_jsonl(path: str | Path, *, user_key: str = "user", text_key: str = "text") -> UserCorpus:
    """One JSON object per line: `{"user": ..., "text": ...}`."""
    path = Path(path)
    corpus: UserCorpus = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from e
        if not isinstance(row, dict) or user_key not in row or text_key not in row:
            raise DataError(f"{path}:{n}: expected an object with {user_key!r} and {text_key!r} keys")
        if not isinstance(row[text_key], str):
            raise DataError(f"{path}:{n}: {text_key!r} must be a string")
        if row[text_key].strip():
            corpus.setdefault(str(row[user_key]), []).append(row[text_key].strip())
    return _check(corpus, str(path))


_SPEAKER = re.compile(r"^([A-Z][A-Za-z' .-]*):$")


def read_shakespeare(path: str | Path, *, min_turns: int = 20, max_users: int | None = None) -> UserCorpus:
    """Tiny Shakespeare: blank-line-separated speaker blocks; a speaker is a user, a turn a document."""
    path = Path(path)
    turns: list[tuple[str, list[str]]] = []
    for n, block in enumerate(_read_text(path).split("\n\n"), 1):
        lines = block.strip("\n").split("\n")
        if _SPEAKER.match(lines[0]):
            turns.append((lines[0][:-1], lines[1:]))
        elif turns and block.strip():  # a speech separated from its speaker line by a blank line
            turns[-1][1].extend(lines)
        elif block.strip():
            log.debug("%s: block %d has no speaker; skipped", path, n)
    corpus: UserCorpus = {}
    for speaker, lines in turns:  # the source has a few empty turns (a speaker line and nothing else)
        if text := "\n".join(lines).strip():
            corpus.setdefault(speaker, []).append(text)
    corpus = {u: d for u, d in corpus.items() if len(d) >= min_turns}
    ranked = sorted(corpus, key=lambda u: (-len(corpus[u]), u))
    if max_users:
        ranked = ranked[:max_users]
    return _check({u: corpus[u] for u in ranked}, f"{path} (speakers with >= {min_turns} turns)")


def read_agnews(path: str | Path) -> UserCorpus:
    """AG News CSV (`class,title,description`, no header): a class is a user, `title. description` a document."""
    path = Path(path)
    if path.is_dir():
        path = path / "test.csv"
    classes_file = path.with_name("classes.txt")
    names = (_read_text(classes_file).split() if classes_file.is_file() else [])
    corpus: UserCorpus = {}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) != 3 or not row[0].isdigit():
                    raise DataError(f"{path}:{n}: expected 3 fields class,title,description")
                cid = int(row[0])
                user = names[cid - 1] if 0 < cid <= len(names) else f"class{cid}"
                text = f"{row[1].strip()}. {row[2].strip()}".replace("\\", "\n")
                text = text.replace(" #36;", "$").replace("#36;", "$").replace("#39;", "'")
                corpus.setdefault(user.replace("/", "-"), []).append(text)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    return _check(corpus, str(path))


def load_corpus(source: str, *, fmt: str | None = None) -> UserCorpus:
    """Dispatch on `fmt` (folder | jsonl | shakespeare | agnews | fortunes) or guess it from `source`.

    `fortunes` or `fortunes:en,de` names the built-in Debian corpus (downloaded once into the cache).
    """
    if fmt is None:
        if source == "fortunes" or source.startswith("fortunes:"):
            fmt = "fortunes"
        else:
            p = Path(source)
            if not p.exists():
                raise DataError(f"corpus {source!r} not found (no such file or directory)")
            if p.is_dir():
                fmt = "agnews" if (p / "test.csv").is_file() else "folder"
            elif p.suffix == ".jsonl":
                fmt = "jsonl"
            elif p.suffix == ".csv":
                fmt = "agnews"
            elif p.suffix == ".txt":
                fmt = "shakespeare"
            else:
                raise DataError(f"cannot tell the format of {source}; pass fmt= folder|jsonl|shakespeare|agnews")
    if fmt == "fortunes":
        from .fortunes import read_fortunes

        langs = source.split(":", 1)[1].split(",") if ":" in source else None
        return read_fortunes(langs)
    readers = {"folder": read_folder, "jsonl": read_jsonl, "shakespeare": read_shakespeare, "agnews": read_agnews}
    if fmt not in readers:
        raise DataError(f"unknown corpus format {fmt!r}; choose one of {sorted(readers) + ['fortunes']}")
    if not Path(source).exists():
        raise DataError(f"corpus {source!r} not found (no such file or directory)")
    return readers[fmt](source)
