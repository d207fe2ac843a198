"""Training-step memory of single-LoRA vs mixture models at real geometries, computed on the `meta` device.

A forward on `meta` tensors allocates nothing but runs the same autograd graph, so the bytes autograd saves for
backward are exact for any geometry, batch and dtype, on a machine without a GPU. Together with the weights, the
adapters, their gradients and AdamW moments this is the memory resident when backward starts: a lower bound of
a GPU's peak (the peak adds transient buffers of backward and the allocator's caching), and an exact comparison
between paths. It answers "does E=8 fit on an 80 GB card?" before renting one.
"""

from __future__ import annotations

import logging

import torch

from ..errors import PocketLMError
from ..moe import MoEConfig, inject_moe, shared_base_view
from .geometries import GEOMETRIES, load_bench_model
from .train_bench import adapter_bytes, path_options, saved_activation_bytes

log = logging.getLogger(__name__)


def meta_model(geometry: str, dtype: str | torch.dtype = "bfloat16"):
    if geometry not in GEOMETRIES:
        raise PocketLMError(f"memory estimates need a geometry ({', '.join(GEOMETRIES)}), got {geometry!r}")
    return load_bench_model(geometry, device="meta", dtype=dtype)[0]


def _row(model, ids, weights: int) -> dict:
    saved = saved_activation_bytes(model, ids)
    state = adapter_bytes(model)
    # weights + adapters (state includes adapters and 2 AdamW moments) + adapter gradients + saved activations
    resident = weights + state["per_user_bytes"] + state["adapter_bytes"] + saved
    return {"saved_activation_bytes": saved, **state, "resident_at_backward_bytes": resident}


def bench_memory(base: torch.nn.Module, *, experts=(2, 4, 8), paths=("fused", "reference"), batch: int = 64,
                 seq: int = 128, rank: int = 8, top_k: int = 2) -> dict:
    """Exact activation memory and resident bytes per (E, path) for a meta-device `base` (see module doc)."""
    if next(base.parameters()).device.type != "meta":
        raise PocketLMError("bench_memory needs a model on the meta device (see meta_model)")
    weights = sum(p.numel() * p.element_size() for p in base.parameters())
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    single = _row(inject_moe(shared_base_view(base), MoEConfig(num_experts=1, router=False, rank=rank)), ids,
                  weights)
    doc = {"weights_bytes": weights, "batch": batch, "seq": seq,
           "dtype": str(next(base.parameters()).dtype).replace("torch.", ""), "single_lora": single, "results": []}
    for e in experts:
        for path in paths:
            cfg = MoEConfig(num_experts=e, top_k=top_k, rank=rank, **path_options(path))
            row = _row(inject_moe(shared_base_view(base), cfg), ids, weights)
            row["activation_ratio"] = row["saved_activation_bytes"] / single["saved_activation_bytes"]
            doc["results"].append({"experts": e, "path": path, **row})
            log.info("E=%d %s: %.2f GiB saved activations", e, path, row["saved_activation_bytes"] / 2**30)
    return doc
