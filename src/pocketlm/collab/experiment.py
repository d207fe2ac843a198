"""Experiments from a config: load the model and users once, run one or several strategies, collect results.

`compare` runs strategies on the same frozen base and the same deterministic splits, so their per-user
perplexities are directly comparable. Its JSON is `{"scenario", "strategies": {NAME: {"per_user_ppl",
"mean_ppl", "eval_at", "before_aggregation": {"per_user_ppl", "mean_ppl"}, "after_aggregation": {...}}}}` (the
top-level pair is the one at `eval_at`) plus the settings and each strategy's history (for the plots).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import build_scenario, load_corpus
from ..models import load_model
from .config import TrainConfig
from .simulation import Simulation
from .strategies import get_strategy

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What all strategies of one experiment share: the frozen base, its tokenizer, the users' tokens."""

    cfg: TrainConfig
    base: torch.nn.Module
    tokenizer: object
    data: dict

    @classmethod
    def load(cls, cfg: TrainConfig) -> Workspace:
        base, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        data = build_scenario(load_corpus(cfg.corpus, fmt=cfg.corpus_format), tok, scenario=cfg.scenario,
                              seed=cfg.seed, max_chars=cfg.max_chars)
        return cls(cfg, base, tok, data)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0


def run_strategy(ws: Workspace, name: str, *, resume: bool = False, stop_after: int | None = None,
                 cfg: TrainConfig | None = None) -> Simulation:
    cfg = cfg or ws.cfg
    strategy = get_strategy(name)
    out = Path(cfg.out_dir.replace("{strategy}", name))
    torch.manual_seed(cfg.seed)
    sim = Simulation(cfg, strategy, ws.base, ws.data, out, pad_id=ws.pad_id)
    t0 = time.time()
    sim.run(resume=resume, stop_after=stop_after)
    log.info("%s finished in %.0fs", name, time.time() - t0)
    return sim


def compare(ws: Workspace, names: list[str], *, resume: bool = False) -> dict:
    """Run each strategy and gather `{"scenario", "strategies": {name: {"per_user_ppl", "mean_ppl"}}}`."""
    doc = {"scenario": ws.cfg.scenario, "model": ws.cfg.model, "corpus": ws.cfg.corpus,
           "config": ws.cfg.to_dict(), "strategies": {}, "histories": {}}
    for name in names:
        sim = run_strategy(ws, name, resume=resume)
        doc["strategies"][name] = sim.final()
        doc["histories"][name] = sim.history
    return doc
