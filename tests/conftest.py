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


@pytest.fixture
def folder_corpus(tmp_path: Path) -> Path:
    """Three users, each with several short .txt documents in a distinct style."""
    root = tmp_path / "corpus"
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


@pytest.fixture(scope="module")
def serve_pair():
    """(cloud, device, tokenizer) tiny models for the step-server tests (tests/serve_fixtures.py)."""
    from serve_fixtures import tiny_pair

    return tiny_pair()


@pytest.fixture(scope="module")
def serve_server(serve_pair):
    """The cloud model of `serve_pair` served on a free loopback port for one test module."""
    from serve_fixtures import start_server

    cloud, _, tok = serve_pair
    srv = start_server(cloud, tok)
    yield srv
    srv.stop()
