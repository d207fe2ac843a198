"""Which KV cache a stream decodes with: 'static' (fixed-shape steps, CUDA graphs on a GPU), 'compiled' (static
with `torch.compile`), 'dynamic' (HF DynamicCache), or 'auto' (static where the architecture allows).

Its own module so that neither stream implementation imports the other.
"""

from __future__ import annotations

from ...errors import PocketLMError
from .dynamic import LMStream
from .static import StaticLMStream, static_unsupported

KV_MODES = ("auto", "static", "compiled", "dynamic")


def resolve_kv(model, kv: str) -> str:
    """'auto' = the static KV cache (CUDA graphs on a GPU) when the architecture allows, else the dynamic cache.
    Static is faster on a CPU too (BENCHMARKS.md), though bf16 logits differ in the last bits from HF's
    attention kernels: reproduce runs recorded with the dynamic cache with kv='dynamic'. 'compiled' is static
    with the step compiled by torch.compile before capture (minutes of compilation per live batch size)."""
    if kv not in KV_MODES:
        raise PocketLMError(f"kv must be one of {', '.join(KV_MODES)}, got {kv!r}")
    if kv != "auto":
        return kv
    return "static" if static_unsupported(model) is None else "dynamic"


def cache_modes(model) -> tuple[str, ...]:
    """The modes `model` can decode with, the one 'auto' picks first."""
    if static_unsupported(model) is None:
        return ("static", "compiled", "dynamic")
    return ("dynamic",)


def make_stream(model, pad_id: int = 0, kv: str = "auto"):
    """An `LMStream` (dynamic cache) or a `StaticLMStream` (fixed shapes, graphs on CUDA)."""
    mode = resolve_kv(model, kv)
    if mode in ("static", "compiled"):
        return StaticLMStream(model, pad_id, compile=mode == "compiled")
    return LMStream(model, pad_id)
