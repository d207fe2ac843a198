"""A user's personal device model: the frozen base plus that user's adapters from a CoMiGS run.

A training run leaves `users/<user>/{shared,private}.safetensors` (generalists + attention LoRA averaged by the
server; specialists and router private) and `adapter_config.json` (the mixture layout and a fingerprint of the
base it was trained on). Loading rebuilds the mixture on a structural copy of the base (the base tensors are
shared, so a cloud that is the same model is left untouched), loads both parts and puts the model in inference
mode (the default fused path, no auxiliary loss, no graphs). Runs written before `adapter_config.json` existed
are read through the run's `history.json` and the tensors' own names and shapes (moe.state reads the files).

A Flower device's state directory (`device.json`, collab.flower.state) is the same personal model: the latest
global shared parts plus the device's private experts and router.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from ..errors import PocketLMError
from .inject import MoEConfig, inject_moe, shared_base_view
from .lora import AttnLoRALinear
from .mixture import MixtureMLP
from .state import (
    ADAPTER_CONFIG,
    PRIVATE_FILE,
    SHARED_FILE,
    check_base,
    load_trainable_state,
    read_layout,
    read_parts,
)

__all__ = ["ADAPTER_CONFIG", "load_personal", "mark_shared"]


def load_personal(base: nn.Module, directory: str | Path) -> nn.Module:
    """The base with one user's adapters (a new module over the same base tensors), ready for decoding."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise PocketLMError(f"adapter directory {d} not found (expected a run's users/<user> folder or a device "
                            "state directory)")
    state, shared_names, run = _read_adapters(d)
    layout, fingerprint = read_layout(d, state, run)
    check_base(d, fingerprint, base)
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


def _read_adapters(d: Path) -> tuple[dict, set[str], dict | None]:
    """(adapters, names from the shared part, run settings for a layout without adapter_config.json)."""
    # the device format belongs to the federation's state module (which imports no Flower)
    from ..collab.flower import state as device_state

    if device_state.is_device_state(d):
        dev = device_state.read_device(d)
        return dev.params, dev.shared_names, dev.meta
    if not (d / SHARED_FILE).is_file() and not (d / PRIVATE_FILE).is_file():
        raise PocketLMError(f"{d} holds no {SHARED_FILE} / {PRIVATE_FILE} and no device.json: not a user's adapter "
                            "folder or a device state")
    return (*read_parts(d), None)


def mark_shared(model: nn.Module, shared_names: set[str]) -> None:
    """Tell each mixture which of its experts, and each attention LoRA whether it, came from the shared part:
    the SHARED row mode (moe.row_adapters) runs the model with only those on."""
    for name, m in model.named_modules():
        if isinstance(m, MixtureMLP):
            m.mark_shared(i for i in range(m.num_experts)
                          if any(n.startswith(f"{name}.experts.{i}.") for n in shared_names))
        elif isinstance(m, AttnLoRALinear):
            m.shared = any(n.startswith(f"{name}.attn_lora.") for n in shared_names)
