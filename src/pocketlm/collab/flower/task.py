"""The CoMiGS work a Flower node or server does, written against `Device` / `Server` / strategies only.

`client_app.py` and `server_app.py` stay thin and call these functions; nothing here imports Flower, so the
same code runs in the in-process simulation's terms (a node = one simulated `Device`). Binding a device's
adapters into the shared model happens in exactly one place, `bind_device`.

Run settings come from Flower's run config (`[tool.flwr.app.config]` in pyproject.toml, `--run-config`):
keys named like `TrainConfig` fields (`model`, `rounds`, `local_steps`, ...) configure training, exactly as in
`configs/*.toml`; `config` may name such a TOML file (loaded first, then the other keys override it). Keys
with dashes (`min-available-nodes`, `secagg`, `dp`, ...) configure the federation (`FLSettings`).

Node settings come from the SuperNode's `--node-config`: `partition-id` (which user of the run's corpus this
node is; Flower's simulation engine sets it), or `user-dir` (a folder of this device's own `.txt` documents);
`state-dir` (where the private state lives; default `<state-root>/<user>` from the run config);
optionally `experts` (this device's number of experts).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ...data import UserTokens, build_scenario, load_corpus
from ...data.corpora import read_folder
from ...errors import PocketLMError
from ...eval import perplexity
from ...models import load_model
from ...moe import inject_moe, param_role, shared_base_view
from ..client import Device
from ..config import FIELDS, PROTOCOLS, ConfigError, TrainConfig, load_config
from ..server import Server, Upload
from ..strategies import Strategy, experts_per_user, get_strategy
from .state import PrivateState

log = logging.getLogger(__name__)


@dataclass
class FLSettings:
    """Federation settings (dashed keys of the run config)."""

    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 1
    round_timeout: float = 3600.0        # seconds the server waits for replies in one round
    max_update_norm: float = 0.0         # reject an upload whose L2 distance to the global state is larger (0: off)
    state_root: str = "~/.cache/pocketlm/fl-state"
    secagg: bool = False                 # SecAgg+ for the shared tensors (Flower's secaggplus_mod + workflow)
    secagg_num_shares: float = 1.0       # int > 2, or a fraction of the sampled nodes
    secagg_threshold: float = 0.5        # int, or a fraction of num_shares
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 2**22
    secagg_max_weight: float = 1.0       # >= the largest weight (1 for uniform; the token count for `tokens`)
    dp: str = "off"                      # off | server | client: Flower's fixed-clipping DP wrappers
    dp_noise_multiplier: float = 1.0
    dp_clipping_norm: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.fraction_train <= 1 or not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError("fraction-train and fraction-evaluate must be in [0, 1]")
        if self.min_available_nodes < 1 or self.min_train_nodes < 1:
            raise ConfigError("min-available-nodes and min-train-nodes must be >= 1")
        if self.dp not in ("off", "server", "client"):
            raise ConfigError(f"dp must be off, server or client, got {self.dp!r}")
        if self.dp != "off" and (self.dp_clipping_norm <= 0 or self.dp_noise_multiplier < 0):
            raise ConfigError("dp-clipping-norm must be > 0 and dp-noise-multiplier >= 0")
        if self.secagg and self.dp != "off":
            raise ConfigError("secagg and dp cannot be combined here yet; turn one off")
        if self.round_timeout <= 0 or self.max_update_norm < 0:
            raise ConfigError("round-timeout must be > 0 and max-update-norm >= 0")


FL_KEYS = {f.name.replace("_", "-"): f for f in fields(FLSettings)}


def settings(run_config: dict) -> tuple[TrainConfig, FLSettings]:
    """Split Flower's run config into the training config and the federation settings."""
    train, fl, path = {}, {}, None
    for key, value in dict(run_config).items():
        if key == "config":
            path = str(value) or None
        elif key in FL_KEYS:
            fl[FL_KEYS[key].name] = value
        elif key in FIELDS:
            if value == "" and key in PROTOCOLS["clean"]:  # unset: the protocol (or the default) decides
                continue
            train[key] = value
        else:
            raise ConfigError(f"unknown run-config key {key!r}; training keys: {sorted(FIELDS)}; "
                              f"federation keys: {sorted(FL_KEYS)}")
    cfg = load_config(path, train)
    try:
        st = FLSettings(**{k: type(getattr(FLSettings, k))(v) if k != "secagg" else _bool(v)
                           for k, v in fl.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad federation setting: {e}") from e
    st.validate()
    return cfg, st


def _bool(v) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on")


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


_CACHE: dict = {}  # per process: the frozen base, tokenizer and corpus (Flower may reuse a process)


def _base(cfg: TrainConfig):
    key = ("base", cfg.model, cfg.device, cfg.dtype, cfg.seed)
    if key not in _CACHE:
        _CACHE[key] = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed)
    return _CACHE[key]


def _scenario(cfg: TrainConfig, source: str, tok, corpus=None) -> dict[str, UserTokens]:
    key = ("data", cfg.model, source, cfg.corpus_format, cfg.scenario, cfg.seed, cfg.max_chars)
    if key not in _CACHE:
        corpus = corpus if corpus is not None else load_corpus(source, fmt=cfg.corpus_format)
        _CACHE[key] = build_scenario(corpus, tok, scenario=cfg.scenario, seed=cfg.seed, max_chars=cfg.max_chars)
    return _CACHE[key]


def node_setup(run_config: dict, node_config: dict) -> NodeSetup:
    """Who this node is (user, data, expert count, state directory), from the run and node configs."""
    cfg, fl = settings(run_config)
    strategy = get_strategy(cfg.strategy).for_config(cfg)
    if not strategy.trains or strategy.pooled:
        raise ConfigError(f"strategy {strategy.name!r} does not train on devices; use 1g1s, 2g, 2s, local or fedavg")
    _, tok = _base(cfg)
    node_config = dict(node_config)
    if "user-dir" in node_config:
        udir = Path(str(node_config["user-dir"])).expanduser()
        if cfg.scenario != "id":
            raise ConfigError("a device with its own user-dir can only run the 'id' scenario (ood needs every "
                              "user's text for validation)")
        corpus = {udir.name: read_folder(udir.parent)[udir.name]} if udir.is_dir() else None
        if corpus is None:
            raise ConfigError(f"user-dir {udir} is not a directory")
        data = _scenario(cfg, str(udir), tok, corpus)
        users = [udir.name]
        user = udir.name
    elif "partition-id" in node_config:
        data = _scenario(cfg, cfg.corpus, tok)
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


def _model_for(cfg: TrainConfig, strategy: Strategy, experts: int) -> nn.Module:
    key = ("model", cfg.model, cfg.device, cfg.dtype, cfg.seed, strategy.name, experts, cfg.rank, cfg.alpha,
           cfg.top_k, cfg.path, cfg.recompute, cfg.lb_coef, cfg.router, cfg.baseline_experts)
    if key not in _CACHE:
        base, _ = _base(cfg)
        model = inject_moe(shared_base_view(base), strategy.moe_config(cfg, experts))
        init = {n: p.detach().clone() for n, p in model.named_parameters() if param_role(n) is not None}
        _CACHE[key] = (model, init)
    return _CACHE[key]


def bind_device(model: nn.Module, device: Device):
    """The one place a device's adapters are put into the shared model: a scoped binding (restored on exit)."""
    return device.bound(model)


# -- the node's round -----------------------------------------------------------------------------------
class Node:
    """One device behind a SuperNode: built fresh per message, its private state loaded from / saved to disk."""

    def __init__(self, setup: NodeSetup):
        self.setup = setup
        cfg = setup.cfg
        self.model, init = _model_for(cfg, setup.strategy, setup.experts)
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
        with torch.no_grad():
            for n, t in global_state.items():
                if n in self.device.params and self.server.shares(n):
                    p = self.device.params[n]
                    if tuple(t.shape) != tuple(p.shape):
                        raise PocketLMError(f"server sent {n} with shape {tuple(t.shape)}, device has {tuple(p.shape)}")
                    p.copy_(t.to(p.dtype))

    def train(self, global_state: dict[str, torch.Tensor], order: list[str] | None = None,
              server_round: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """One CoMiGS local update; returns the shared tensors to upload (in `order` where given) and metrics.
        The private state is on disk before anything is returned."""
        s = self.setup
        self.download(global_state)
        losses = self.device.local_update(self.model, s.tokens.train, s.tokens.val, s.cfg.local_steps)  # binds itself
        finite = [x for x in losses if math.isfinite(x)]
        self.rounds_done += 1
        self.store.save(self.device.state_dict(), {"rounds_done": self.rounds_done, "server_round": server_round})
        names = self.shared_names()
        if order is not None:
            held = set(names)
            names = [n for n in order if n in held] + [n for n in names if n not in set(order)]
        upload = {n: self.device.params[n].detach().cpu().float().clone() for n in names}
        weight = 1 if s.cfg.aggregation == "uniform" else self.device.train_tokens
        metrics = {"num-examples": weight, "train-tokens": self.device.train_tokens,
                   "train-loss": sum(finite) / len(finite) if finite else float("nan"),
                   "skipped-steps": self.device.skipped, "step": self.device.step}
        return upload, metrics

    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict:
        s = self.setup
        self.download(global_state)
        stream = s.tokens.test[: s.cfg.max_eval_tokens] if s.cfg.max_eval_tokens else s.tokens.test
        with bind_device(self.model, self.device) as model:
            ppl = perplexity(model, stream, block_len=s.cfg.seq_len, batch_size=s.cfg.eval_batch_size,
                             pad_id=s.pad_id)
        return {"num-examples": int(stream.numel()), "ppl": ppl}


# -- the server's side -----------------------------------------------------------------------------------
def initial_global_state(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The shared tensors every device starts from (all devices initialise them identically from the seed and
    the tensor's name); built with the largest expert count so that every shared name is present."""
    strategy = get_strategy(cfg.strategy).for_config(cfg)
    experts = max(cfg.experts) if cfg.experts and strategy.experts > 1 else strategy.experts
    _, init = _model_for(cfg, strategy, experts)
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
