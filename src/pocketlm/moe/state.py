"""Adapter I/O, the one module that reads and writes a user's adapters: state by role, the shared and private
parts as separate safetensors, and `adapter_config.json` (the layout and the base it was trained on).

What is uploaded, averaged or kept private follows from roles alone, in simulation and federation alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import PocketLMError
from ..jsonfile import write_json
from ..models.vocab import head_rows
from .inject import ROLES, param_role

log = logging.getLogger(__name__)

SHARED_FILE, PRIVATE_FILE = "shared.safetensors", "private.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


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
    write_adapter_config(model, d)
    return paths


def read_part(path: Path) -> dict[str, torch.Tensor]:
    """One safetensors part; a damaged file gives an error naming it."""
    try:
        return load_file(str(path))
    except Exception as e:
        raise PocketLMError(f"cannot read {path} (corrupt?): {e}") from e


def read_parts(directory: Path) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Both parts written by `save_parts` in one state (a missing part reads as empty), and the names of the
    tensors that came from the shared part."""
    state: dict[str, torch.Tensor] = {}
    shared_names: set[str] = set()
    for name in (SHARED_FILE, PRIVATE_FILE):
        if (directory / name).is_file():
            part = read_part(directory / name)
            state.update(part)
            if name == SHARED_FILE:
                shared_names = set(part)
    return state, shared_names


def load_parts(model: nn.Module, directory: str | Path) -> None:
    """Load both parts written by `save_parts` (a missing private part is allowed: a fresh device)."""
    d = Path(directory)
    if not (d / SHARED_FILE).is_file():
        raise PocketLMError(f"{d} has no {SHARED_FILE}")
    load_trainable_state(model, read_parts(d)[0], strict=True)


def base_fingerprint(model: nn.Module) -> dict:
    """What must match between the base an adapter was trained on and the one it is loaded onto."""
    cfg = model.config
    return {"model_type": cfg.model_type, "vocab_rows": head_rows(model),
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers}


def check_base(directory: Path, fingerprint: dict | None, base: nn.Module) -> None:
    """Refuse adapters whose recorded base fingerprint differs from `base` (None: nothing was recorded)."""
    if fingerprint is None:
        return
    mine = base_fingerprint(base)
    bad = [f"{k} {fingerprint.get(k)} != {v}" for k, v in mine.items() if fingerprint.get(k) != v]
    if bad:
        raise PocketLMError(f"{directory / ADAPTER_CONFIG}: adapters were trained on another base model "
                            f"({'; '.join(bad)})")


def write_adapter_config(model: nn.Module, directory: str | Path) -> Path:
    """Record the mixture layout and the base fingerprint beside a user's adapter files (atomic)."""
    path = Path(directory) / ADAPTER_CONFIG
    moe = dataclasses.asdict(model.moe_config) if hasattr(model, "moe_config") else {}
    write_json({"moe": moe, "base": base_fingerprint(model)}, path)
    return path


def _layout_from_tensors(state: dict[str, torch.Tensor], run_config: dict) -> dict:
    experts = {int(n.split(".experts.", 1)[1].split(".", 1)[0]) for n in state if ".experts." in n}
    ranks = {t.shape[0] for n, t in state.items() if n.endswith("lora_A")}
    return {"num_experts": max(experts) + 1 if experts else 1, "rank": ranks.pop() if ranks else 8,
            "router": any(".router." in n for n in state), "attn_lora": any(".attn_lora." in n for n in state),
            **{k: run_config[k] for k in ("alpha", "top_k", "seed") if k in run_config}}


def read_layout(directory: Path, state: dict[str, torch.Tensor], run: dict | None = None) -> tuple[dict, dict | None]:
    """(MoEConfig keywords, base fingerprint or None) for the adapters in `directory`; without an
    adapter_config.json from `run` (settings) or the run's history.json, and the tensors."""
    path = directory / ADAPTER_CONFIG
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            return dict(doc["moe"]), doc.get("base")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PocketLMError(f"{path} is not a pocketlm adapter config ({e})") from None
    history = directory.parent.parent / "history.json"
    if run is None and history.is_file():
        try:
            run = json.loads(history.read_text()).get("config", {})
        except json.JSONDecodeError:
            raise PocketLMError(f"{history} is corrupt (not JSON)") from None
    run = run or {}
    log.info("%s has no %s; layout read from the tensors%s", directory, ADAPTER_CONFIG,
             " and " + str(history) if run else "")
    return _layout_from_tensors(state, run), None
