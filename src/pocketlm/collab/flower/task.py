"""The CoMiGS work a Flower node or server does, written against `Device` / `Server` / strategies only.

`client_app.py` and `server_app.py` stay thin and call these functions; nothing here imports Flower, so the
same code runs in the in-process simulation's terms (a node = one simulated `Device`, its round built from the
simulation's own pieces: `model_view`, `mean_loss`, `eval_stream`, `score_ppl`, `Device.download`). Binding
a device's adapters into the shared model happens in exactly one place, `bind_device`.

Run settings come from Flower's run config (collab.flower.settings). Node settings come from the SuperNode's
`--node-config`: `partition-id` (which user of the run's corpus this node is; Flower's simulation engine sets
it), or `user-dir` (a folder of this device's own `.txt` documents); `state-dir` (where the private state
lives; default `<state-root>/<user>` from the run config); optionally `experts` (this device's number of
experts).

What a process loads once (the frozen base, the users' tokens, model views) lives in a `Resources` object that
the app owns and passes in: no module-level cache, so two apps (or two tests) in one process never share state
by accident.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...data import UserTokens, build_scenario, load_corpus
from ...data.corpora import read_folder
from ...models import load_model
from ...moe import param_role
from ...moe.state import write_adapter_config
from ..client import Device
from ..config import ConfigError, TrainConfig
from ..server import Server, Upload
from ..simulation import eval_stream, mean_loss, model_view, score_ppl
from ..strategies import Strategy, experts_per_user, get_strategy
from .settings import FL_KEYS, FLSettings, settings
from .state import PrivateState

__all__ = ["FL_KEYS", "ConfigError", "FLSettings", "Node", "NodeSetup", "Resources", "aggregate", "bind_device",
           "initial_global_state", "new_server", "node_setup", "settings", "update_norm"]

log = logging.getLogger(__name__)


# -- what a process loads once ----------------------------------------------------------------------------
class Resources:
    """The frozen base and tokenizer, the users' tokens and the model views (with their initial adapters) a
    process has loaded, by what determines them (Flower may reuse a process for many messages)."""

    def __init__(self):
        self._bases: dict = {}
        self._data: dict = {}
        self._models: dict = {}

    def base(self, cfg: TrainConfig):
        key = (cfg.model, cfg.device, cfg.dtype, cfg.seed)
        if key not in self._bases:
            self._bases[key] = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
        return self._bases[key]

    def scenario(self, cfg: TrainConfig, source: str, tok, corpus=None) -> dict[str, UserTokens]:
        key = (cfg.model, source, cfg.corpus_format, cfg.scenario, cfg.seed, cfg.max_chars)
        if key not in self._data:
            corpus = corpus if corpus is not None else load_corpus(source, fmt=cfg.corpus_format)
            self._data[key] = build_scenario(corpus, tok, scenario=cfg.scenario, seed=cfg.seed,
                                             max_chars=cfg.max_chars)
        return self._data[key]

    def model_for(self, cfg: TrainConfig, strategy: Strategy, experts: int) -> tuple[nn.Module, dict]:
        """The shared model view for this expert count and the adapters every device starts from."""
        key = (cfg.model, cfg.device, cfg.dtype, cfg.seed, strategy.name, experts, cfg.rank, cfg.alpha,
               cfg.top_k, cfg.path, cfg.recompute, cfg.lb_coef, cfg.router, cfg.baseline_experts)
        if key not in self._models:
            model = model_view(self.base(cfg)[0], strategy, cfg, experts)
            init = {n: p.detach().clone() for n, p in model.named_parameters() if param_role(n) is not None}
            self._models[key] = (model, init)
        return self._models[key]


# -- what a node is ------------------------------------------------------------------------------------
@dataclass
class NodeSetup:
    cfg: TrainConfig
    strategy: Strategy
    user: str
    tokens: UserTokens
    experts: int
    state_dir: Path
    pad_id: int


def node_setup(run_config: dict, node_config: dict, res: Resources | None = None) -> NodeSetup:
    """Who this node is (user, data, expert count, state directory), from the run and node configs."""
    res = res or Resources()
    cfg, fl = settings(run_config)
    strategy = get_strategy(cfg.strategy).for_config(cfg)
    if not strategy.trains or strategy.pooled:
        raise ConfigError(f"strategy {strategy.name!r} does not train on devices; use 1g1s, 2g, 2s, local or fedavg")
    _, tok = res.base(cfg)
    node_config = dict(node_config)
    if "user-dir" in node_config:
        udir = Path(str(node_config["user-dir"])).expanduser()
        if cfg.scenario != "id":
            raise ConfigError("a device with its own user-dir can only run the 'id' scenario (ood needs every "
                              "user's text for validation)")
        corpus = {udir.name: read_folder(udir.parent)[udir.name]} if udir.is_dir() else None
        if corpus is None:
            raise ConfigError(f"user-dir {udir} is not a directory")
        data = res.scenario(cfg, str(udir), tok, corpus)
        users = [udir.name]
        user = udir.name
    elif "partition-id" in node_config:
        data = res.scenario(cfg, cfg.corpus, tok)
        users = list(data)
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(users):
            raise ConfigError(f"partition-id {pid} out of range: the corpus has {len(users)} users {users}")
        user = users[pid]
    else:
        raise ConfigError("node config needs partition-id=N (a user of the run's corpus) or user-dir=PATH")
    if "experts" in node_config:
        experts = int(node_config["experts"])
    elif "partition-id" in node_config:
        experts = experts_per_user(strategy, users, cfg.experts)[user]
    else:
        experts = strategy.experts
    state_dir = Path(str(node_config.get("state-dir") or Path(fl.state_root) / user)).expanduser()
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return NodeSetup(cfg, strategy, user, data[user], experts, state_dir, pad)


def bind_device(model: nn.Module, device: Device):
    """The one place a device's adapters are put into the shared model: a scoped binding (restored on exit)."""
    return device.bound(model)


# -- the node's round -----------------------------------------------------------------------------------
class Node:
    """One device behind a SuperNode: built fresh per message, its private state loaded from / saved to disk."""

    def __init__(self, setup: NodeSetup, res: Resources | None = None):
        self.setup = setup
        cfg = setup.cfg
        self.model, init = (res or Resources()).model_for(cfg, setup.strategy, setup.experts)
        self.device = Device(setup.user, self.model, cfg, bilevel=setup.strategy.router, batch_size=cfg.batch_size,
                             train_tokens=int(setup.tokens.train.numel()))
        with torch.no_grad():     # the model may still hold the adapters of the device it served last
            for n, t in init.items():
                self.device.params[n].copy_(t)
        self.server = Server(setup.strategy.shared_roles, cfg.aggregation)   # only for `shares`
        self.store = PrivateState(setup.state_dir, self.identity())
        self.rounds_done = 0
        loaded = self.store.load()
        if loaded is not None:
            state, meta = loaded
            self.store.check_params(state, self.device.params, setup.state_dir / meta["tensors"])
            self.device.load_state_dict(state)
            self.rounds_done = int(meta.get("rounds_done", 0))
            log.info("%s: resumed from %s (step %d, %d round(s) done)", setup.user, self.store.meta_path,
                     self.device.step, self.rounds_done)

    def identity(self) -> dict:
        s = self.setup
        return {"user": s.user, "model": s.cfg.model, "strategy": s.strategy.name, "experts": s.experts,
                "rank": s.cfg.rank, "alpha": s.cfg.alpha, "top_k": s.cfg.top_k}

    def shared_names(self) -> list[str]:
        return [n for n in self.device.params if self.server.shares(n)]

    def download(self, global_state: dict[str, torch.Tensor]) -> None:
        """Take the server's values for the shared tensors this device holds (others are ignored)."""
        self.device.download(global_state, self.server.shares)

    def train(self, global_state: dict[str, torch.Tensor], order: list[str] | None = None,
              server_round: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """One CoMiGS local update; returns the shared tensors to upload (in `order` where given) and metrics.
        The private state is on disk before anything is returned."""
        s = self.setup
        self.download(global_state)
        losses = self.device.local_update(self.model, s.tokens.train, s.tokens.val, s.cfg.local_steps)  # binds itself
        self.rounds_done += 1
        write_adapter_config(self.model, s.state_dir)      # the layout and base a steering device checks
        self.store.save(self.device.state_dict(), {"rounds_done": self.rounds_done, "server_round": server_round,
                                                   "shared_roles": sorted(s.strategy.shared_roles)})
        names = self.shared_names()
        if order is not None:
            held = set(names)
            names = [n for n in order if n in held] + [n for n in names if n not in set(order)]
        upload = {n: self.device.params[n].detach().cpu().float().clone() for n in names}
        weight = 1 if s.cfg.aggregation == "uniform" else self.device.train_tokens
        metrics = {"num-examples": weight, "train-tokens": self.device.train_tokens,
                   "train-loss": mean_loss(losses),
                   "skipped-steps": self.device.skipped, "step": self.device.step}
        return upload, metrics

    def keep_global(self, global_state: dict[str, torch.Tensor], server_round: int) -> bool:
        """Store the server's final average of the shared tensors this device holds (collab.flower.state), so
        the device steers with the federation's last shared parts. False: this device has not trained yet."""
        return self.store.save_global(global_state, server_round) is not None

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict:
        s = self.setup
        self.download(global_state)
        stream = eval_stream(s.tokens, s.cfg)
        with bind_device(self.model, self.device) as model:
            ppl = score_ppl(model, stream, s.cfg, s.pad_id)
        return {"num-examples": int(stream.numel()), "ppl": ppl}


# -- the server's side -----------------------------------------------------------------------------------
def initial_global_state(cfg: TrainConfig, res: Resources | None = None) -> dict[str, torch.Tensor]:
    """The shared tensors every device starts from (all devices initialise them identically from the seed and
    the tensor's name); built with the largest expert count so that every shared name is present."""
    strategy = get_strategy(cfg.strategy).for_config(cfg)
    experts = max(cfg.experts) if cfg.experts and strategy.experts > 1 else strategy.experts
    _, init = (res or Resources()).model_for(cfg, strategy, experts)
    server = Server(strategy.shared_roles, cfg.aggregation)
    server.init_from([init])
    return server.global_state


def new_server(cfg: TrainConfig, global_state: dict[str, torch.Tensor]) -> Server:
    server = Server(get_strategy(cfg.strategy).for_config(cfg).shared_roles, cfg.aggregation)
    server.global_state = dict(global_state)
    return server


def update_norm(upload: Upload, global_state: dict[str, torch.Tensor]) -> float:
    """L2 norm of the change an upload proposes, over the tensors the server knows with the same shape."""
    total = 0.0
    for n, t in upload.state.items():
        ref = global_state.get(n)
        if ref is not None and tuple(ref.shape) == tuple(t.shape):
            total += float(((t.float() - ref.float()) ** 2).sum())
    return math.sqrt(total)


def aggregate(server: Server, uploads: list[Upload], max_norm: float = 0.0) -> dict[str, str]:
    """Check and average the uploads into `server.global_state`; returns {user: why rejected}."""
    rejected, kept = {}, []
    for up in uploads:
        norm = update_norm(up, server.global_state) if max_norm > 0 else 0.0
        if max_norm > 0 and not (norm <= max_norm):   # NaN norms are left to the server's finiteness check
            if math.isfinite(norm):
                rejected[up.user] = f"update norm {norm:.4g} > max-update-norm {max_norm:.4g}"
                log.warning("server: rejected the update of %s: %s", up.user, rejected[up.user])
                continue
        kept.append(up)
    if kept:
        rejected.update(server.aggregate(kept).rejected)
    return rejected
