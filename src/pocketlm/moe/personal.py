"""A user's personal device model: the frozen base plus that user's adapters from a CoMiGS run.

A training run leaves `users/<user>/{shared,private}.safetensors` (generalists + attention LoRA averaged by the
server; specialists and router private) and `adapter_config.json` (the mixture layout and a fingerprint of the
base it was trained on). Loading rebuilds the mixture on a structural copy of the base (the base tensors are
shared, so a cloud that is the same model is left untouched), loads both parts and puts the model in inference
mode (the default fused path, no auxiliary loss, no graphs). Runs written before `adapter_config.json` existed
are read through the run's `history.json` and the tensors' own names and shapes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import PocketLMError
from .inject import MoEConfig, inject_moe, shared_base_view
from .lora import AttnLoRALinear
from .mixture import MixtureMLP
from .state import PRIVATE_FILE, SHARED_FILE, load_trainable_state, read_part

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def base_fingerprint(model: nn.Module) -> dict:
    """What must match between the base an adapter was trained on and the one it is loaded onto."""
    cfg = model.config
    return {"model_type": cfg.model_type, "vocab_rows": model.get_output_embeddings().weight.shape[0],
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers}


def write_adapter_config(model: nn.Module, directory: str | Path) -> Path:
    """Record the mixture layout and the base fingerprint beside a user's adapter files (atomic)."""
    from ..jsonfile import write_json

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


def read_layout(directory: Path, state: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """(MoEConfig keywords, base fingerprint or None) for the adapters in `directory`."""
    path = directory / ADAPTER_CONFIG
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
            return dict(doc["moe"]), doc.get("base")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise PocketLMError(f"{path} is not a pocketlm adapter config ({e})") from None
    run = {}
    history = directory.parent.parent / "history.json"
    if history.is_file():
        try:
            run = json.loads(history.read_text()).get("config", {})
        except json.JSONDecodeError:
            raise PocketLMError(f"{history} is corrupt (not JSON)") from None
    log.info("%s has no %s; layout read from the tensors%s", directory, ADAPTER_CONFIG,
             " and " + str(history) if run else "")
    return _layout_from_tensors(state, run), None


def load_personal(base: nn.Module, directory: str | Path) -> nn.Module:
    """The base with one user's adapters (a new module over the same base tensors), ready for decoding."""
    d = Path(directory)
    if not d.is_dir():
        raise PocketLMError(f"adapter directory {d} not found (expected a run's users/<user> folder)")
    if not (d / SHARED_FILE).is_file() and not (d / PRIVATE_FILE).is_file():
        raise PocketLMError(f"{d} holds no {SHARED_FILE} / {PRIVATE_FILE}: not a user's adapter folder")
    state: dict[str, torch.Tensor] = {}
    shared_names: set[str] = set()
    for name in (SHARED_FILE, PRIVATE_FILE):
        if (d / name).is_file():
            part = read_part(d / name)
            state.update(part)
            if name == SHARED_FILE:
                shared_names = set(part)
    layout, fingerprint = read_layout(d, state)
    if fingerprint is not None:
        mine = base_fingerprint(base)
        bad = [f"{k} {fingerprint.get(k)} != {v}" for k, v in mine.items() if fingerprint.get(k) != v]
        if bad:
            raise PocketLMError(f"{d / ADAPTER_CONFIG}: adapters were trained on another base model ({'; '.join(bad)})")
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    cfg = MoEConfig(**{k: v for k, v in layout.items() if k in known})
    cfg = dataclasses.replace(cfg, path="fused", recompute=False, lb_coef=0.0)
    model = inject_moe(shared_base_view(base), cfg)
    try:
        load_trainable_state(model, state, strict=True)
    except PocketLMError as e:
        raise PocketLMError(f"{d}: the adapters do not fit the base model or layout: {e}") from None
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise PocketLMError(f"{d}: the adapter files lack {len(missing)} tensors of this layout, e.g. {missing[0]}")
    for p in model.parameters():
        p.requires_grad_(False)
    mark_shared(model, shared_names)
    return model.eval()


def mark_shared(model: nn.Module, shared_names: set[str]) -> None:
    """Tell each mixture which of its experts, and each attention LoRA whether it, came from the shared part:
    the SHARED row mode (moe.row_adapters) runs the model with only those on."""
    for name, m in model.named_modules():
        if isinstance(m, MixtureMLP):
            m.shared_experts = frozenset(i for i in range(m.num_experts)
                                         if any(n.startswith(f"{name}.experts.{i}.") for n in shared_names))
        elif isinstance(m, AttnLoRALinear):
            m.shared = any(n.startswith(f"{name}.attn_lora.") for n in shared_names)
