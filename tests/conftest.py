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


def _graph_tensors() -> list:
    """Every live tensor that carries an autograd graph (`grad_fn`), found by a full garbage-collector scan."""
    import gc
    import warnings

    import torch

    gc.collect()
    found = []
    with warnings.catch_warnings():  # isinstance() on some lazy module proxies warns of deprecations
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor) and obj.grad_fn is not None:
                    found.append(obj)
            except Exception:  # noqa: BLE001 - some objects raise on isinstance (lazy proxies)
                continue
    return found


@pytest.fixture
def graph_tensors():
    """A function listing the live tensors with a grad_fn: after a step, a leaked graph shows up here."""
    return _graph_tensors

def tiny_workspace(corpus: Path, tmp_path: Path, **over):
    """A collaboration workspace on tiny-llama over `corpus`: a schedule small enough for a test."""
    from pocketlm.collab import Workspace, load_config

    cfg = load_config(None, {"model": "tiny-llama", "corpus": str(corpus), "max_chars": None, "rounds": 3,
                             "local_steps": 2, "batch_size": 2, "seq_len": 16, "router_every": 2,
                             "router_steps": 1, "seed": 0, "out_dir": str(tmp_path / "runs" / "{strategy}"), **over})
    return Workspace.load(cfg)

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

@pytest.fixture
def folder_corpus(tmp_path: Path) -> Path:
    return write_folder_corpus(tmp_path / "corpus")
