"""Shared fixtures: tiny corpora written to tmp dirs, paths to ../shared data, quiet progress bars."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("POCKETLM_PROGRESS", "0")

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("POCKETLM_SHARED") or REPO.parent / "shared")


@pytest.fixture
def shared() -> Path:
    return shared_dir()


def write_folder_corpus(root: Path) -> Path:
    """Three users, each with several short .txt documents in a distinct style."""
    styles = {
        "alice": "the cat sat on the mat and purred quietly {}",
        "bob": "ERROR 404: page {} was not found on the server",
        "carol": "mi piace la pizza con funghi numero {}",
    }
    for user, pattern in styles.items():
        (root / user).mkdir(parents=True)
        for i in range(12):
            (root / user / f"{i:02d}.txt").write_text(pattern.format(i) + "\n")
    return root


@pytest.fixture
def folder_corpus(tmp_path: Path) -> Path:
    return write_folder_corpus(tmp_path / "corpus")
