"""Training-step benchmark: a single-LoRA model vs the CoMiGS mixture (fused and reference paths).

All configurations share one frozen base (parameters are shared, not copied), use the same batch, and are
timed in the same run, so the ratios are comparable even on a noisy machine. Step = forward + backward +
AdamW step over the trainable adapters.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time

import torch
from torch import nn

from ..errors import PocketLMError
from ..models.vocab import head_rows
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
    memory also counts the allocator's caching and the weights).

    The pack hook stores only a size record, never the tensor: a hook that returned the tensor itself would make
    every tensor that is an output of the op saving it reference its own `grad_fn` (a cycle the garbage collector
    cannot see), and keep the whole forward graph alive after the call. The storages are held in a local list
    until the forward ends instead (as a real graph would hold them, so no address is reused and counted twice),
    and freed on return. This graph cannot run backward."""
    weights = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}
    held = []

    def pack(t: torch.Tensor) -> int:
        st = t.untyped_storage()
        if st._cdata not in weights and st._cdata not in seen:
            seen[st._cdata] = st.nbytes()
            held.append(st)
        return st.nbytes()

    def unpack(_record: int):
        raise RuntimeError("saved_activation_bytes builds a measuring graph only; it cannot run backward")

    model.train()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = model(input_ids=ids, labels=ids).loss
    del loss, held[:]
    return sum(seen.values())


def adapter_bytes(model: nn.Module) -> dict[str, int]:
    """Per-user state: trainable adapters, their AdamW moments (2x), in the adapters' dtype."""
    n = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"adapter_bytes": n, "adamw_state_bytes": 2 * n, "per_user_bytes": 3 * n}


def peft_model(base: nn.Module, *, rank: int = 8, alpha: float = 16.0) -> nn.Module:
    """The outside baseline: a PEFT `LoraConfig` LoRA of the same rank and scale on the same modules as our
    single LoRA (every attention and MLP projection), over a `shared_base_view` of `base` (PEFT replaces modules
    in the model it wraps; the view keeps `base` itself untouched and the weights shared)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise PocketLMError(f"the peft row needs the `peft` package (pip install 'pocketlm[bench]'): {e}") from e
    from ..moe.family import adapter_targets

    targets = adapter_targets(base)
    if not targets:
        raise PocketLMError("the peft row needs llama-style or GPT-2 MLP blocks")
    # rsLoRA scale alpha / sqrt(r), as ours; adapters in the base's dtype, as ours (PEFT would upcast to fp32)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=True, lora_dropout=0.0, target_modules=targets,
                     bias="none")
    return get_peft_model(shared_base_view(base), cfg, autocast_adapter_dtype=False)


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

    def _out_of_memory(self) -> None:
        """Called after the `except` block has ended, so its traceback (whose frames hold the failed step's
        activations) is gone before the cache is emptied."""
        self.oom = True
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("%s: out of memory; reported as OOM", self.name)

    def measure_saved(self, ids: torch.Tensor) -> None:
        failed = False
        try:
            self.saved = saved_activation_bytes(self.model, ids)
        except torch.OutOfMemoryError:
            failed = True
        if failed:
            self._out_of_memory()

    def step(self, ids: torch.Tensor, record: bool) -> None:
        if self.oom:
            return
        device = ids.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.model.train()
        failed = False
        try:
            _sync(device)
            t0 = time.perf_counter()
            self.model(input_ids=ids, labels=ids).loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            _sync(device)
            elapsed = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            failed = True
        if failed:
            self._out_of_memory()
            return
        if record:
            self.times.append(elapsed)
            if device.type == "cuda":
                self.peak = max(self.peak or 0, torch.cuda.max_memory_allocated(device))

    def row(self) -> dict:
        if self.oom:
            return {"step_s": None, "oom": True, "saved_activation_bytes": self.saved}
        return {"step_s": statistics.median(self.times), "peak_mem_bytes": self.peak,
                "saved_activation_bytes": self.saved, **adapter_bytes(self.model)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def bench_train(base: nn.Module, *, experts=(2, 4, 8), paths=("fused", "reference"), batch: int = 4,
                seq: int = 128, steps: int = 5, warmup: int = 2, rank: int = 8, alpha: float = 16.0,
                top_k: int = 2, seed: int = 0, peft: bool = True, single: bool = True) -> dict:
    """Time the single-LoRA baseline, a PEFT LoRA (`peft`) and every (E, path) on one shared frozen base and
    one batch. Ratios are against our single LoRA (`ratio`) and against PEFT (`ratio_vs_peft`).

    Steps are interleaved round-robin across configurations, so background load (other processes, clock
    changes) hits every configuration alike and the ratios stay meaningful on a busy machine. Holding every
    configuration at once costs only its adapters and optimizer moments: each step's graph is freed by its
    backward, and a configuration that runs out of memory is marked OOM and frees what it held.
    `single=False` leaves the baseline out (the GPU suite times each configuration in its own process).
    """
    device = next(base.parameters()).device
    vocab = head_rows(base)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed)).to(device)
    configs = [("single", MoEConfig(num_experts=1, router=False, rank=rank, alpha=alpha, seed=seed))] if single else []
    configs += [((e, path), MoEConfig(num_experts=e, top_k=top_k, rank=rank, alpha=alpha, seed=seed,
                                      **path_options(path)))
                for e in experts for path in paths]
    runners = [_Runner(str(key), inject_moe(shared_base_view(base), cfg)) for key, cfg in configs]
    if peft:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            runners.append(_Runner("peft", peft_model(base, rank=rank, alpha=alpha)))
    for r in runners:
        r.measure_saved(ids)
    for i in progress(range(warmup + steps), desc="train-step rounds", total=warmup + steps):
        for r in runners:
            r.step(ids, record=i >= warmup)
    by_name = {r.name: r.row() for r in runners}
    single_row = by_name.get("single", {"step_s": None})
    peft_row = by_name.get("peft")
    peft_s = peft_row["step_s"] if peft_row else None
    doc = {"single_lora_step_s": single_row["step_s"], "single_lora": single_row, "results": [],
           "batch": batch, "seq": seq, "steps": steps, "rank": rank, "alpha": alpha, "device": str(device),
           "dtype": str(next(base.parameters()).dtype).replace("torch.", "")}
    doc["single_lora"]["ratio"] = _ratio(single_row["step_s"], single_row["step_s"])
    if peft_row is not None:
        doc["peft"] = {**peft_row, "ratio": _ratio(peft_s, single_row["step_s"]), "ratio_vs_peft": _ratio(peft_s, peft_s)}
        doc["single_lora"]["ratio_vs_peft"] = _ratio(single_row["step_s"], peft_s)
    for key, _ in configs:
        if key == "single":
            continue
        row = by_name[str(key)]
        ratio = _ratio(row["step_s"], single_row["step_s"])
        doc["results"].append({"experts": key[0], "path": key[1], **row, "ratio": ratio,
                               "ratio_vs_peft": _ratio(row["step_s"], peft_s)})
        log.info("E=%d %s: %s s/step, ratio %s", key[0], key[1], row.get("step_s"), ratio)
    return doc
