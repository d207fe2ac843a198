"""Turn a Hugging Face causal LM into a CoMiGS mixture model, in place.

Supported families (moe.family): llama-style gated MLPs (llama, qwen2, qwen3, mistral: gate/up/down + act_fn)
and GPT-2 (c_fc/c_proj Conv1D + act). Every base parameter is frozen; only LoRA factors and routers train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from ..errors import PocketLMError
from .context import RoutingTally, layer_context
from .family import mlp_blocks
from .lora import AttnLoRALinear, LoRAFactors
from .mixture import MixtureMLP
from .router import ROUTERS

log = logging.getLogger(__name__)

PATHS = ("fused", "fused_dense", "reference")


@dataclass
class MoEConfig:
    num_experts: int = 2        # E >= 1: expert 0 is the generalist, 1..E-1 specialists; E=1 has no router
    top_k: int = 2              # effective k = min(top_k, E)
    rank: int = 8
    alpha: float = 16.0         # scale alpha / sqrt(rank)
    path: str = "fused"         # "fused" (top-k dispatch when k < E) | "fused_dense" | "reference"
    recompute: bool = False     # fused paths: rebuild per-expert activations in backward (less memory)
    attn_lora: bool = True      # one shared LoRA on every attention projection
    router: bool = True         # False: uniform mean over experts (official Local/FedAvg baselines)
    router_type: str = "linear"  # "linear" (official GPT-2 router) | "official" (Llama-family noisy gate)
    lb_coef: float = 0.0        # load-balancing loss coefficient
    seed: int = 0

    def __post_init__(self):
        if self.num_experts < 1 or self.top_k < 1 or self.rank < 1 or self.alpha <= 0:
            raise PocketLMError(f"invalid MoE config: {self}")
        if self.path not in PATHS:
            raise PocketLMError(f"unknown mixture path {self.path!r}; choose one of {PATHS}")
        if self.router_type not in ROUTERS:
            raise PocketLMError(f"unknown router {self.router_type!r}; choose one of {ROUTERS}")


def _attention(block: nn.Module) -> nn.Module | None:
    return getattr(block, "self_attn", None) or getattr(block, "attn", None)


def inject_moe(model: nn.Module, cfg: MoEConfig) -> nn.Module:
    """Freeze the base, replace every MLP by a `MixtureMLP`, add attention LoRA. Returns the same model."""
    blocks = mlp_blocks(model)
    if not blocks:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise PocketLMError(f"cannot inject experts into {arch!r}: no llama-style or GPT-2 MLP blocks found")
    for p in model.parameters():
        p.requires_grad_(False)
    for block, _, mlp, fam in blocks:
        block.mlp = MixtureMLP(mlp, fam, num_experts=cfg.num_experts, top_k=cfg.top_k, rank=cfg.rank,
                               alpha=cfg.alpha, path=cfg.path, router=cfg.router, lb_coef=cfg.lb_coef,
                               recompute=cfg.recompute, router_type=cfg.router_type)
        attn = _attention(block)
        if cfg.attn_lora and attn is not None:
            for proj in fam.attention:
                lin = getattr(attn, proj, None)
                if lin is not None and not isinstance(lin, AttnLoRALinear):
                    setattr(attn, proj, AttnLoRALinear(lin, cfg.rank, cfg.alpha))
    reset_adapters(model, seed=cfg.seed)
    model.moe_config = cfg
    return model


def shared_base_view(base: nn.Module) -> nn.Module:
    """A structural copy of `base` whose parameters are the same tensors (memory grows by adapters only)."""
    import copy

    return copy.deepcopy(base, {id(p): p for p in base.parameters()})


def reset_adapters(model: nn.Module, seed: int = 0) -> None:
    """Re-initialise every LoRA (A random per name, B zero) and router (N(0, 0.02) per name)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRAFactors):
            module.reset(seed, name)
        elif isinstance(module, MixtureMLP) and module.router is not None:
            module.router.reset(seed, f"{name}.router")
    for name, p in model.named_parameters():
        p.requires_grad_(param_role(name) is not None)


def mixture_layers(model: nn.Module) -> list[tuple[int, MixtureMLP]]:
    return [(i, m) for i, m in enumerate(m for m in model.modules() if isinstance(m, MixtureMLP))]


class RoutingRecorder:
    """Context manager, the only source of routing statistics: accumulate the generalist's gate share over all
    forwards inside it; `stats` = {layer: share of gate weight on expert 0} once it closes."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in mixture_layers(model)]
        self.stats: dict[int, float] = {}
        self._tallies: list[RoutingTally] = []
        self._block = None

    def __enter__(self):
        self._tallies = [RoutingTally() for _ in self.layers]
        self._block = layer_context(self.layers, record=self._tallies)
        self._block.__enter__()
        return self

    def __exit__(self, *exc):
        self._block.__exit__(*exc)
        shares = [t.share() for t in self._tallies]
        self.stats = {i: s for i, s in enumerate(shares) if s is not None}
        return False


ROLES = ("generalist", "specialist", "router", "attn_lora")


def param_role(name: str) -> str | None:
    """Role of a parameter by name: generalist / specialist / router / attn_lora, None for frozen base."""
    if ".attn_lora." in name:
        return "attn_lora"
    if ".router." in name:
        return "router"
    idx = expert_index(name)
    if idx is not None:
        return "generalist" if idx == 0 else "specialist"
    return None


def expert_index(name: str) -> int | None:
    """The expert a parameter belongs to (`...experts.<e>...`), None for routers, attention LoRA and the base."""
    if ".experts." not in name or ".attn_lora." in name or ".router." in name:
        return None
    return int(name.split(".experts.", 1)[1].split(".", 1)[0])
