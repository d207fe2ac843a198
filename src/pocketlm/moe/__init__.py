"""CoMiGS mixture of LoRA experts: layers, injection into HF models, parameter roles, shared/private files.

Layout: `family` (MLP layouts), `router` (the two routers, one interface), `lora` + `mixture` + `fused` (the
layers), `context` (what one forward needs beyond its input), `inject` (HF model -> mixture model, roles),
`aux` / `row_adapters` (the blocks that set a forward's context), `state` (adapter I/O), `personal` (a user's
device model from a run).
"""

from .aux import AuxLosses, collect_aux
from .context import ForwardContext
from .family import FAMILIES, MLPFamily
from .inject import (
    ROLES,
    MoEConfig,
    RoutingRecorder,
    expert_index,
    inject_moe,
    mixture_layers,
    param_role,
    reset_adapters,
    shared_base_view,
)
from .lora import AttnLoRALinear, LoRAFactors
from .mixture import MixtureMLP
from .router import ROUTERS, LinearRouter, OfficialGate, balance_loss
from .state import load_parts, load_trainable_state, save_parts, trainable_state

__all__ = [
    "FAMILIES", "ROLES", "ROUTERS", "AttnLoRALinear", "AuxLosses", "ForwardContext", "LinearRouter", "LoRAFactors",
    "MLPFamily", "MixtureMLP", "MoEConfig", "OfficialGate", "RoutingRecorder", "balance_loss", "collect_aux", "expert_index", "inject_moe", "load_parts",
    "load_trainable_state", "mixture_layers", "param_role", "reset_adapters", "save_parts", "shared_base_view",
    "trainable_state",
]
