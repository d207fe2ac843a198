"""CoMiGS mixture of LoRA experts: layers, injection into HF models, parameter roles, shared/private files."""

from .inject import (
    ROLES,
    MoEConfig,
    RoutingRecorder,
    expert_index,
    inject_moe,
    mixture_layers,
    moe_aux_loss,
    param_role,
    reset_adapters,
    routing_stats,
    shared_base_view,
)
from .lora import AttnLoRALinear, LoRAFactors
from .mixture import MixtureMLP
from .router import ROUTERS, OfficialGate, balance_loss
from .state import load_parts, load_trainable_state, save_parts, trainable_state

__all__ = [
    "ROLES", "ROUTERS", "AttnLoRALinear", "LoRAFactors", "MixtureMLP", "MoEConfig", "OfficialGate",
    "RoutingRecorder", "balance_loss", "expert_index", "inject_moe", "load_parts", "load_trainable_state",
    "mixture_layers", "moe_aux_loss", "param_role", "reset_adapters", "routing_stats", "save_parts",
    "shared_base_view", "trainable_state",
]
