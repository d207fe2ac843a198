"""One typed experiment config, loadable from TOML and overridable from the command line.

Every CoMiGS experiment is reproducible from one file plus `--set key=value` overrides: the defaults are the
official hyper-parameters (comigs.md §2.3); the shipped CPU configs scale batch and steps down.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PocketLMError
from ..moe.inject import PATHS
from ..moe.router import ROUTERS


class ConfigError(PocketLMError):
    """A config file or override is malformed or names an unknown key."""


EVAL_AT = ("after_aggregation", "before_aggregation")

# One switch for what differs between pocketlm's clean protocol and the official code (issue 15,
# docs/architecture.md "Protocols"): `protocol=official` sets these four keys over the config file's values;
# explicit `--set` overrides still win.
PROTOCOLS = {
    "clean": {"official_compat": False, "router": "linear", "eval_at": "after_aggregation", "baseline_experts": 1},
    "official": {"official_compat": True, "router": "official", "eval_at": "before_aggregation",
                 "baseline_experts": 2},
}


@dataclass
class TrainConfig:
    # what
    model: str = "smollm2-135m"
    corpus: str = "fortunes:en,de,es,it"
    corpus_format: str | None = None
    scenario: str = "id"                 # id | ood
    max_chars: int | None = 60_000       # text per user, after shuffling (CPU budgets)
    strategy: str = "1g1s"
    experts: list[int] = field(default_factory=list)  # per-user expert counts (heterogeneous); [] = strategy's
    # schedule (official: 20 rounds x 10 steps, batch 64 x 128, router every 30 steps for 10 steps)
    rounds: int = 20
    local_steps: int = 10
    batch_size: int = 64
    seq_len: int = 128
    router_every: int = 30               # tau: a router phase after every tau expert steps
    router_steps: int = 10
    # optimisation
    lr: float = 2e-3
    lr_min: float = 2e-4                 # cosine from lr to lr_min over all expert steps
    router_lr: float = 2e-3              # constant
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    official_compat: bool = False        # reproduce the official gradient leakage between the two optimizers
    lb_coef: float = 0.0                 # linear router's load-balancing loss (inert for E = k = 2)
    # mixture
    router: str = "linear"               # linear (official GPT-2 router) | official (Llama-family noisy gate)
    baseline_experts: int = 1            # local/fedavg/centralized: 1 LoRA, or 2 uniformly mixed (official)
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    path: str = "fused"                  # fused | fused_dense | reference (same function, different cost)
    recompute: bool = False              # fused paths: recompute per-expert activations in backward
    # server
    aggregation: str = "uniform"         # uniform (official) | tokens (weighted by training tokens)
    # evaluation and bookkeeping
    eval_at: str = "after_aggregation"   # the headline number: after_aggregation | before_aggregation (official)
    eval_every: int = 1                  # rounds; the last round is always evaluated
    eval_round0: bool = True             # evaluate before training (= the pretrained model) for the curves
    eval_batch_size: int = 8
    max_eval_tokens: int | None = None   # cap each test stream (CPU budgets); None = the whole split
    seed: int = 42
    device: str | None = None
    dtype: str = "float32"
    out_dir: str = "runs/{config}/{strategy}"
    # the switch that set official_compat, router, eval_at and baseline_experts together (see PROTOCOLS);
    # in load_config only, where it applies over the file's values and under --set overrides
    protocol: str = "clean"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.scenario not in ("id", "ood"):
            raise ConfigError(f"scenario must be 'id' or 'ood', got {self.scenario!r}")
        if self.aggregation not in ("uniform", "tokens"):
            raise ConfigError(f"aggregation must be 'uniform' or 'tokens', got {self.aggregation!r}")
        if self.path not in PATHS:
            raise ConfigError(f"path must be one of {', '.join(PATHS)}, got {self.path!r}")
        for name in ("rounds", "local_steps", "batch_size", "seq_len", "router_every", "rank", "top_k",
                     "eval_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.router_steps < 0 or self.lr <= 0 or self.lr_min < 0 or self.router_lr <= 0:
            raise ConfigError("router_steps must be >= 0 and learning rates positive")
        if self.router not in ROUTERS:
            raise ConfigError(f"router must be one of {', '.join(ROUTERS)}, got {self.router!r}")
        if self.eval_at not in EVAL_AT:
            raise ConfigError(f"eval_at must be one of {', '.join(EVAL_AT)}, got {self.eval_at!r}")
        if self.baseline_experts not in (1, 2):
            raise ConfigError(f"baseline_experts must be 1 or 2, got {self.baseline_experts}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if any(e < 1 for e in self.experts):
            raise ConfigError(f"every user needs >= 1 expert, got experts={self.experts}")

    @property
    def total_steps(self) -> int:
        return self.rounds * self.local_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value):
    """Convert a TOML value or a `--set` string to the field's declared type."""
    hint = typing.get_type_hints(TrainConfig)[key]
    optional, base = False, hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None))
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    if typing.get_origin(base) is list or base is list:
        if isinstance(value, str):
            value = [v for v in value.replace("[", "").replace("]", "").split(",") if v.strip()]
        try:
            return [int(v) for v in value]
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be a list of integers, got {value!r}") from None
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} expects {getattr(base, '__name__', base)}, got {value!r}") from None


def _expand(value):
    """`${VAR:-default}` in string values: data paths such as the AG News folder come from the environment."""
    if not isinstance(value, str) or "${" not in value:
        return value
    import re

    def sub(m):
        name, _, default = m.group(1).partition(":-")
        return os.environ.get(name) or default

    return re.sub(r"\$\{([^}]+)\}", sub, value)


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a TOML file (flat keys, or keys grouped in any tables) and apply `key=value` overrides."""
    values: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config {p} not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p} is not valid TOML: {e}") from e
        for k, v in raw.items():
            if isinstance(v, dict):  # [tables] only group keys
                values.update(v)
            else:
                values[k] = v
        values.setdefault("_name", p.stem)
    name = values.pop("_name", "adhoc")
    if isinstance(overrides, dict):
        over = dict(overrides)
    else:
        over = {}
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
            k, v = item.split("=", 1)
            over[k.strip()] = v
    if "protocol" in over or "protocol" in values:   # an explicit switch: file < protocol < --set
        protocol = str(over.get("protocol", values.get("protocol"))).strip()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        values.update(PROTOCOLS[protocol])
        values["protocol"] = protocol
        over.pop("protocol", None)
    values.update(over)
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(FIELDS)}")
    cfg = TrainConfig(**{k: _coerce(k, _expand(v)) for k, v in values.items()})
    cfg.out_dir = cfg.out_dir.replace("{config}", name)
    return cfg
