"""A simulated device and its CoMiGS local update (bi-level: experts on train, router on validation).

A device is only its adapter tensors, two AdamW optimizers, the expert LR schedule, a step counter and a batch
RNG. Many devices share one model (one frozen base); a device's adapters are installed into it (the parameter
objects themselves, no copy) only inside `with device.bound(model): ...`, which puts the model's previous
parameters back on exit, so no code outside the block can silently compute with some user's adapters.
`local_update` binds by itself.
Memory grows by adapter size per device. Optimizer state persists across rounds, as in the official code.

Gradient hygiene (comigs.md §2.4): the official code lets each optimizer zero only its own parameters, so the
first router step of a phase sees 30 training-batch gradients and the expert step after a phase sees 10
validation gradients. By default we keep the two levels clean (each phase computes gradients only for what it
updates); `official_compat=True` reproduces the leakage exactly.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..data.packing import sample_windows
from ..errors import PocketLMError
from ..moe import collect_aux, expert_index, param_role
from ..moe.lora import named_generator

log = logging.getLogger(__name__)

EXPERT_ROLES = ("generalist", "specialist", "attn_lora")


@contextmanager
def bound(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[nn.Module]:
    """Inside the block `model` computes with these parameter objects (no copy; the frozen base stays shared);
    on exit, even by an exception, the parameters it had before are back. Nests.

    Binding is plain attribute assignment: `setattr(module, leaf, parameter)` re-registers a parameter through
    `nn.Module`'s public API, so each device costs its adapters only, whatever torch keeps privately."""
    slots = []
    for name in params:
        mod_name, leaf = name.rsplit(".", 1)
        module = model.get_submodule(mod_name)
        previous = dict(module.named_parameters(recurse=False)).get(leaf)
        if previous is None:
            raise KeyError(f"{name} is not a parameter of this model")
        slots.append((module, leaf, previous))
    try:
        for (module, leaf, _), p in zip(slots, params.values(), strict=True):
            setattr(module, leaf, p)
        yield model
    finally:
        for module, leaf, previous in slots:
            setattr(module, leaf, previous)


def cosine_factor(step: int, total: int, min_ratio: float) -> float:
    """LR multiplier: cosine from 1 to `min_ratio` over `total` steps, no warm-up (official schedule)."""
    t = min(step, total) / max(total, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class Device:
    """One simulated user: adapters, optimizers, schedule, counters. Nothing here is ever uploaded except
    the tensors whose role the strategy shares."""

    def __init__(self, name: str, model: nn.Module, cfg, *, bilevel: bool, train_tokens: int, batch_size: int):
        self.name, self.cfg, self.bilevel = name, cfg, bilevel
        self.batch_size = batch_size
        self.train_tokens = train_tokens
        self.params = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()
                       if param_role(n) is not None}
        self.num_experts = len({expert_index(n) for n in self.params} - {None})
        self.expert_params = [p for n, p in self.params.items() if param_role(n) in EXPERT_ROLES]
        self.router_params = [p for n, p in self.params.items() if param_role(n) == "router"]
        betas = (cfg.beta1, cfg.beta2)
        self.expert_opt = torch.optim.AdamW(self.expert_params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.expert_opt, lambda s: cosine_factor(s, cfg.total_steps, cfg.lr_min / cfg.lr))
        self.router_opt = None
        if self.router_params:
            self.router_opt = torch.optim.AdamW(self.router_params, lr=cfg.router_lr, betas=betas,
                                                weight_decay=cfg.weight_decay)
        self.step = 0
        self.gen = named_generator(cfg.seed, f"batches:{name}")
        self.skipped = 0

    def bound(self, model: nn.Module):
        """`with device.bound(model): ...`: the model computes with this device's adapters inside the block
        only (see `bound`). `model` must have this device's expert count (`num_experts`)."""
        return bound(model, self.params)

    def download(self, global_state: dict[str, torch.Tensor], shares) -> None:
        """Take the global values of the shared tensors this device holds (`shares(name)`; others are ignored);
        a tensor of the wrong shape is an error, not a broadcast."""
        with torch.no_grad():
            for n, t in global_state.items():
                p = self.params.get(n)
                if p is None or not shares(n):
                    continue
                if tuple(t.shape) != tuple(p.shape):
                    raise PocketLMError(f"server sent {n} with shape {tuple(t.shape)}, device has {tuple(p.shape)}")
                p.copy_(t.to(p.dtype))

    # -- state for checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "params": {n: p.detach().cpu().clone() for n, p in self.params.items()},
            # deep copies: optimizer state dicts alias the live moment tensors, which later steps mutate
            "expert_opt": copy.deepcopy(self.expert_opt.state_dict()), "sched": self.sched.state_dict(),
            "router_opt": copy.deepcopy(self.router_opt.state_dict()) if self.router_opt else None,
            "step": self.step, "gen": self.gen.get_state(), "skipped": self.skipped,
            # official_compat leaves gradients on the tensors between steps (and rounds): part of the state
            "grads": {n: p.grad.detach().cpu().clone() for n, p in self.params.items() if p.grad is not None},
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for n, t in state["params"].items():
                self.params[n].copy_(t)
        grads = state.get("grads", {})
        for n, p in self.params.items():
            p.grad = grads[n].to(p.device, p.dtype).clone() if n in grads else None
        self.expert_opt.load_state_dict(state["expert_opt"])
        self.sched.load_state_dict(state["sched"])
        if self.router_opt is not None:
            self.router_opt.load_state_dict(state["router_opt"])
        self.step, self.skipped = state["step"], state["skipped"]
        self.gen.set_state(state["gen"])

    def adapter_bytes(self) -> int:
        """Adapters + AdamW moments: the memory one more simulated user costs."""
        return 3 * sum(p.numel() * p.element_size() for p in self.params.values())

    # -- training ----------------------------------------------------------------------------------
    def _set_trainable(self, experts: bool, router: bool) -> None:
        for p in self.expert_params:
            p.requires_grad_(experts)
        for p in self.router_params:
            p.requires_grad_(router)

    def _loss(self, model: nn.Module, stream: torch.Tensor) -> torch.Tensor:
        device = next(iter(self.params.values())).device
        ids = sample_windows(stream, self.batch_size, self.cfg.seq_len, self.gen).to(device)
        with collect_aux(model) as aux:
            out = model(input_ids=ids, labels=ids)
        return out.loss + aux.total().to(out.loss.device)

    def _apply(self, loss: torch.Tensor, opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> float:
        value = float(loss.detach())
        if not math.isfinite(value):
            # a non-finite loss would poison the adapters (and, through the server, everyone's): skip it
            self.skipped += 1
            log.warning("%s: non-finite loss at step %d; step skipped", self.name, self.step)
            for p in params:
                p.grad = None
            return value
        loss.backward()
        opt.step()
        if self.cfg.official_compat:
            opt.zero_grad(set_to_none=True)          # only its own parameters: the official leakage
        else:
            for p in self.expert_params + self.router_params:
                p.grad = None
        return value

    def local_update(self, model: nn.Module, train: torch.Tensor, val: torch.Tensor, steps: int) -> list[float]:
        """`steps` expert steps on train batches; after every `router_every`-th step (global count) a router
        phase of `router_steps` steps on validation batches. Binds this device's adapters into `model` for the
        duration (callers need not bind). Returns the expert-step losses."""
        cfg = self.cfg
        losses = []
        compat = cfg.official_compat
        with self.bound(model):
            model.train()
            try:
                for _ in range(steps):
                    if not compat:
                        self._set_trainable(experts=True, router=False)
                    losses.append(self._apply(self._loss(model, train), self.expert_opt, self.expert_params))
                    self.sched.step()
                    self.step += 1
                    if self.bilevel and self.router_opt is not None and self.step % cfg.router_every == 0:
                        if not compat:
                            self._set_trainable(experts=False, router=True)
                        for _ in range(cfg.router_steps):
                            self._apply(self._loss(model, val), self.router_opt, self.router_params)
            finally:
                self._set_trainable(experts=True, router=True)
                model.eval()
        return losses
