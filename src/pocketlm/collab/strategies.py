"""The collaboration strategies: what each user trains, what the server averages, and how the router learns.

| strategy    | experts per user     | router          | averaged by the server                       |
| ----------- | -------------------- | --------------- | -------------------------------------------- |
| 1g1s        | 2 (or `experts`)     | bi-level (val)  | generalist + attention LoRA (CoMiGS)          |
| 2g          | 2                    | bi-level (val)  | both experts + attention LoRA                 |
| 2s          | 2                    | bi-level (val)  | nothing (both experts local)                  |
| local       | `baseline_experts`   | none (uniform)  | nothing                                       |
| fedavg      | `baseline_experts`   | none (uniform)  | every expert + attention LoRA                 |
| centralized | `baseline_experts`,  | none (uniform)  | nothing (one model trained on pooled data)    |
|             | one pooled user      |                 |                                               |
| pretrained  | -                    | -               | no training: the frozen base                  |

`baseline_experts` is 1 (one LoRA, half the adapter parameters of the mixtures; the clean default) or 2 (two
LoRA experts averaged uniformly, no router: the official Local/FedAvg/Centralized baselines). `for_config`
resolves it.

Roles decide everything that is shared (`pocketlm.moe.param_role`), so the same code serves simulation and
federation. A user with one expert under `1g1s` is a generalist-only (weak) device: it has no router.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import PocketLMError
from ..moe import MoEConfig


@dataclass(frozen=True)
class Strategy:
    name: str
    experts: int                 # default experts per user
    shared_roles: frozenset      # roles the server averages
    router: bool                 # learned router (else uniform mean over experts)
    pooled: bool = False         # one model on all users' pooled training data
    trains: bool = True

    def moe_config(self, cfg, num_experts: int | None = None) -> MoEConfig:
        e = num_experts or self.experts
        return MoEConfig(num_experts=e, top_k=cfg.top_k, rank=cfg.rank, alpha=cfg.alpha, path=cfg.path,
                         recompute=cfg.recompute, router=self.router and e > 1, lb_coef=cfg.lb_coef, seed=cfg.seed,
                         router_type=getattr(cfg, "router", "linear"))

    def for_config(self, cfg) -> Strategy:
        """This strategy as `cfg` runs it: a router-less baseline gets `cfg.baseline_experts` experts (fedavg then
        averages every expert, as the official FedAvg does)."""
        n = getattr(cfg, "baseline_experts", 1)
        if self.router or not self.trains or n == self.experts:
            return self
        shared = self.shared_roles | {"specialist"} if self.shared_roles else self.shared_roles
        return replace(self, experts=n, shared_roles=frozenset(shared))

    @property
    def collaborative(self) -> bool:
        return bool(self.shared_roles)


_G = frozenset({"generalist", "attn_lora"})
STRATEGIES = {
    "1g1s": Strategy("1g1s", 2, _G, router=True),
    "2g": Strategy("2g", 2, frozenset({"generalist", "specialist", "attn_lora"}), router=True),
    "2s": Strategy("2s", 2, frozenset(), router=True),
    "local": Strategy("local", 1, frozenset(), router=False),
    "fedavg": Strategy("fedavg", 1, _G, router=False),
    "centralized": Strategy("centralized", 1, frozenset(), router=False, pooled=True),
    "pretrained": Strategy("pretrained", 1, frozenset(), router=False, trains=False),
}


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise PocketLMError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None


def experts_per_user(strategy: Strategy, users: list[str], experts: list[int]) -> dict[str, int]:
    """Expert counts per user: the strategy's default, or the config's heterogeneous list (one per user)."""
    if not experts or strategy.pooled or not strategy.trains:
        return {u: strategy.experts for u in users}
    if not strategy.router:
        raise PocketLMError(f"strategy {strategy.name!r} uses one LoRA per user; `experts` applies to "
                            "mixture strategies (1g1s, 2g, 2s)")
    if len(experts) != len(users):
        raise PocketLMError(f"experts={experts} has {len(experts)} entries but there are {len(users)} users")
    return dict(zip(users, experts, strict=True))
