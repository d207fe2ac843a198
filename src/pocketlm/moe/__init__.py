"""CoMiGS mixture of LoRA experts: layers, injection into HF models, parameter roles, shared/private files."""

from .aux import AuxLosses, collect_aux
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
from .router import ROUTERS, OfficialGate, balance_loss
from .state import load_parts, load_trainable_state, save_parts, trainable_state

__all__ = [
    "ROLES", "ROUTERS", "AttnLoRALinear", "AuxLosses", "LoRAFactors", "MixtureMLP", "MoEConfig", "OfficialGate",
    "RoutingRecorder", "balance_loss", "collect_aux", "expert_index", "inject_moe", "load_parts",
    "load_trainable_state", "mixture_layers", "param_role", "reset_adapters", "save_parts", "shared_base_view",
    "trainable_state",
]
