"""The built-in multilingual corpus: Debian's `fortunes` (en), `fortunes-de`, `fortunes-es`, `fortunes-it`.

Four users in four languages, like the CoMiGS paper's multilingual-Wikipedia users. The .debs come from
Debian's package registry with `apt-get download` and are unpacked with `dpkg -x` into the cache, once.
Entries are separated by a line holding only `%`.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import DataError
from ..paths import home

log = logging.getLogger(__name__)

PACKAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it"}
ROOT_IN_DEB = Path("usr/share/games/fortunes")


def fortunes_dir() -> Path:
    return home() / "corpora" / "fortunes"


def fortunes_available() -> bool:
    return (fortunes_dir() / ".complete").is_file()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def ensure_fortunes() -> Path:
    """Download and unpack the four packages into the cache unless already there; return the tree root."""
    out = fortunes_dir()
    if (out / ".complete").is_file():
        return out / ROOT_IN_DEB
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise DataError(
            "the built-in fortunes corpus needs Debian's apt-get and dpkg (this is not a Debian system); "
            "use a folder-per-user or JSONL corpus instead"
        )
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        pkgs = list(PACKAGES.values())
        res = _run(["apt-get", "download", *pkgs], tmpd)
        if res.returncode != 0:  # empty package lists on a fresh machine: update, then retry once
            log.info("apt-get download failed (%s); running apt-get update", res.stderr.strip()[-200:])
            upd = _run(["apt-get", "update", "-qq"], tmpd)
            res = _run(["apt-get", "download", *pkgs], tmpd)
            if res.returncode != 0:
                raise DataError(
                    "could not download the fortunes packages with apt-get: "
                    f"{(res.stderr or upd.stderr).strip()[-400:]}"
                )
        staging = out.with_name(out.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for deb in sorted(tmpd.glob("*.deb")):
            res = _run(["dpkg", "-x", str(deb), str(staging)], tmpd)
            if res.returncode != 0:
                raise DataError(f"dpkg -x {deb.name} failed: {res.stderr.strip()[-400:]}")
        (staging / ".complete").write_text("\n".join(pkgs))
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)
    return out / ROOT_IN_DEB


def _lang_files(root: Path, lang: str) -> list[Path]:
    folder = root if lang == "en" else root / lang
    if not folder.is_dir():
        raise DataError(f"fortunes for {lang!r} not found under {root}")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
    )


def split_entries(text: str) -> list[str]:
    """Entries end at a line holding only `%` (empty entries from doubled separators are dropped)."""
    entries, current = [], []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in entries if e]


def read_fortunes(langs: list[str] | None = None) -> dict[str, list[str]]:
    """`{lang: [fortune, ...]}` for en, de, es, it (or the subset asked for), in a fixed order."""
    langs = langs or list(PACKAGES)
    unknown = [lang for lang in langs if lang not in PACKAGES]
    if unknown:
        raise DataError(f"unknown fortunes language(s) {unknown}; choose from {list(PACKAGES)}")
    root = ensure_fortunes()
    corpus = {}
    for lang in langs:
        entries = []
        for f in _lang_files(root, lang):
            entries.extend(split_entries(f.read_text(encoding="utf-8", errors="replace")))
        if not entries:
            raise DataError(f"fortunes for {lang!r} are empty under {root}")
        corpus[lang] = entries
    return corpus
