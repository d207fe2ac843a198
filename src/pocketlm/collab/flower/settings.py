"""Flower run settings: the run config's training keys become a `TrainConfig`, its dashed keys `FLSettings`.

Keys named like `TrainConfig` fields (`model`, `rounds`, `local_steps`, ...) configure training, exactly as in
`configs/*.toml`; `config` may name such a TOML file (loaded first, then the other keys override it). Keys with
dashes (`min-available-nodes`, `secagg`, `dp`, ...) configure the federation.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import FIELDS, PROTOCOLS, ConfigError, TrainConfig, load_config


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
