"""Training-step benchmark: a single-LoRA model vs the CoMiGS mixture (fused and reference paths).

All configurations share one frozen base (parameters are shared, not copied), use the same batch, and are
timed in the same run, so the ratios are comparable even on a noisy machine. Step = forward + backward +
AdamW step over the trainable adapters.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn

from ..errors import PocketLMError
from ..moe import MoEConfig, inject_moe, shared_base_view
from ..progress import progress

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BENCH_PATHS = ("fused", "fused_dense", "fused_recompute", "reference")


def path_options(name: str) -> dict:
    """A benchmark path name -> MoEConfig options (`fused_recompute` = fused with activation recomputation)."""
    if name not in BENCH_PATHS:
        raise PocketLMError(f"unknown benchmark path {name!r}; choose from {', '.join(BENCH_PATHS)}")
    if name == "fused_recompute":
        return {"path": "fused", "recompute": True}
    return {"path": name}


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one training forward: the activation memory of a step.

    Counted per storage (views of one tensor count once; weights and buffers not at all), so it works on any
    device, including `meta` (exact sizes for a real geometry and batch without allocating anything; CUDA peak
    memory also counts the allocator's caching and the weights)."""
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st._cdata not in weights:
            seen[st._cdata] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    del loss
    return sum(seen.values())


def adapter_bytes(model: nn.Module) -> dict[str, int]:
    """Per-user state: trainable adapters, their AdamW moments (2x), in the adapters' dtype."""
    n = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"adapter_bytes": n, "adamw_state_bytes": 2 * n, "per_user_bytes": 3 * n}


class _Runner:
    """One configuration: its model view over the shared base and its optimizer."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model = name, model
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                     betas=(0.9, 0.95), weight_decay=0.01)
        self.times: list[float] = []
        self.peak: int | None = None
        self.saved: int | None = None
        self.oom = False

    def step(self, ids: torch.Tensor, record: bool) -> None:
        if self.oom:
            return
        device = ids.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        try:
            _sync(device)
            t0 = time.perf_counter()
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(device)
        except torch.OutOfMemoryError:
            self.oom = True
            self.opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return
        if record:
            self.times.append(time.perf_counter() - t0)
            if device.type == "cuda":
                self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(device))

    def row(self) -> dict:
        if self.oom:
            return {"step_s": None, "oom": True}
        return {"step_s": statistics.median(self.times), "peak_mem_bytes": self.peak,
                "saved_activation_bytes": self.saved, **adapter_bytes(self.model)}


def bench_train(base: nn.Module, *, experts=(2, 4, 8), paths=("fused", "reference"), batch: int = 4,
                seq: int = 128, steps: int = 5, warmup: int = 2, rank: int = 8, top_k: int = 2,
                seed: int = 0) -> dict:
    """Time the single-LoRA baseline and every (E, path) on one shared frozen base and one batch.

    Steps are interleaved round-robin across configurations, so background load (other processes, clock
    changes) hits every configuration alike and the ratios stay meaningful on a busy machine.
    """
    device = next(base.parameters()).device
    vocab = base.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    configs = [("single", MoEConfig(num_experts=1, router=False, rank=rank, seed=seed))]
    configs += [((e, path), MoEConfig(num_experts=e, top_k=top_k, rank=rank, seed=seed, **path_options(path)))
                for e in experts for path in paths]
    runners = [_Runner(str(key), inject_moe(shared_base_view(base), cfg)) for key, cfg in configs]
    for r in runners:
        try:
            r.saved = saved_activation_bytes(r.model, ids)
        except torch.OutOfMemoryError:
            r.oom = True
            torch.cuda.empty_cache()
    for i in progress(range(warmup + steps), desc="train-step rounds", total=warmup + steps):
        for r in runners:
            r.step(ids, record=i >= warmup)
    single = runners[0].row()
    doc = {"single_lora_step_s": single["step_s"], "single_lora": single, "results": [],
           "batch": batch, "seq": seq, "steps": steps, "device": str(device),
           "dtype": str(next(base.parameters()).dtype).replace("torch.", "")}
    for (key, _), r in zip(configs[1:], runners[1:], strict=True):
        row = r.row()
        ratio = row["step_s"] / single["step_s"] if row.get("step_s") and single["step_s"] else None
        doc["results"].append({"experts": key[0], "path": key[1], **row, "ratio": ratio})
        log.info("E=%d %s: %s s/step, ratio %s", key[0], key[1], row.get("step_s"), ratio)
    return doc
