"""Adapter state by role: extract, load, and save the shared and private parts as separate safetensors.

What is uploaded, averaged or kept private follows from roles alone, in simulation and federation alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PocketLMError
from .inject import ROLES, param_role

SHARED_FILE, PRIVATE_FILE = "shared.safetensors", "private.safetensors"


def trainable_state(model: nn.Module, roles: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Detached CPU clones of the adapter parameters whose role is in `roles` (all roles by default)."""
    roles = set(ROLES) if roles is None else set(roles)
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
            if (r := param_role(n)) is not None and r in roles}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy values into the model's adapters. Strict: unknown names or wrong shapes raise, and nothing is
    changed (all checks run before the first copy)."""
    params = dict(model.named_parameters())
    bad = []
    for n, t in state.items():
        p = params.get(n)
        if p is None or param_role(n) is None:
            if strict:
                bad.append(f"unknown adapter {n!r}")
        elif tuple(p.shape) != tuple(t.shape):
            bad.append(f"{n}: shape {tuple(t.shape)} != model {tuple(p.shape)}")
    if bad:
        raise PocketLMError("cannot load adapter state: " + "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    with torch.no_grad():
        for n, t in state.items():
            if n in params:
                params[n].copy_(t.to(params[n].device, params[n].dtype))


def save_parts(model: nn.Module, directory: str | Path, shared_roles: set[str]) -> tuple[Path, Path]:
    """Write `shared.safetensors` (roles in `shared_roles`) and `private.safetensors` (the rest)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    shared = trainable_state(model, set(shared_roles))
    private = trainable_state(model, set(ROLES) - set(shared_roles))
    paths = d / SHARED_FILE, d / PRIVATE_FILE
    for part, path in zip((shared, private), paths, strict=True):
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in part.items()}, str(tmp), metadata={"format": "pt"})
        tmp.replace(path)
    from .personal import write_adapter_config

    write_adapter_config(model, d)
    return paths


def read_part(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors part; a damaged file gives an error naming it."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise PocketLMError(f"cannot read {path} (corrupt?): {e}") from e


def load_parts(model: nn.Module, directory: str | Path) -> None:
    """Load both parts written by `save_parts` (a missing private part is allowed: a fresh device)."""
    d = Path(directory)
    if not (d / SHARED_FILE).is_file():
        raise PocketLMError(f"{d} has no {SHARED_FILE}")
    state = {}
    for name in (SHARED_FILE, PRIVATE_FILE):
        if (d / name).is_file():
            state.update(read_part(d / name))
    load_trainable_state(model, state, strict=True)
