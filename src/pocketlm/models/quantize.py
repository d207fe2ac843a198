"""Weight quantization for the device model on a CPU: `int8` = int8 weights (per output channel), bf16 activations.

Why: a device step is memory-bound (every weight is read once per token), so int8 weights make it faster on a CPU
(BENCHMARKS.md), and phones run their models quantized. Speculative steering drafts on the device, so the device
step sits on its critical path. The quantized model *is* the device model (its scores steer): speculative and
sequential decoding stay identical with it, because the kernel (`torch._weight_int8pack_mm`) computes each row on
its own. That rules out torch's dynamic quantization, whose activation scale is shared by every row of a batch
(a row's scores then depend on which other rows are decoding, and speculation would change the output; measured).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ModelLoadError

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("int8",)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and one bf16 scale per output channel (symmetric, round to nearest)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(flat, self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_device_model(model: nn.Module, mode: str | None, *, role: str = "device",
                          option: str = "--device-quantize") -> nn.Module:
    """`model` with every `nn.Linear` (the LM head included) replaced by an `Int8Linear` and the rest in bf16
    (`mode` "int8"), in place; `model` unchanged for None. CPU models only. `role` / `option` name the model and
    the flag in errors (the step server quantizes its cloud model the same way: `pocketlm serve --quantize`)."""
    if mode is None:
        return model
    if mode not in QUANTIZE_MODES:
        raise ModelLoadError(f"unknown {role} quantization {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")
    if not hasattr(torch, "_weight_int8pack_mm"):
        raise ModelLoadError(f"{option} {mode} needs torch's int8 weight kernel (torch >= 2.3)")
    param = next(model.parameters(), None)
    if param is None:
        raise ModelLoadError(f"the {role} model has no weights to quantize")
    if param.device.type != "cpu":
        raise ModelLoadError(f"{option} {mode} runs on a CPU only; the {role} model is on {param.device}")
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    if not targets:
        raise ModelLoadError(f"the {role} model has no linear layers to quantize")
    model.to(torch.bfloat16)
    for name, linear in targets:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, Int8Linear(linear))
    model.eval()
    log.info("%s model quantized: %d linear layers with int8 weights, bf16 activations", role, len(targets))
    return model


__all__ = ["Int8Linear", "QUANTIZE_MODES", "quantize_device_model"]
