"""A decode stream with a preallocated KV cache and a fixed-shape one-token forward, CUDA-graph captured on GPUs.

Why: HF eager decoding with a DynamicCache spends ~26 ms per step on an H100 in Python, mask building and
kernel launches (issue 4), against a ~5 ms memory floor for a 7B step. Here every decode step has fixed shapes:
the cache is allocated once ([rows, kv_heads, capacity, head_dim] per layer), the new key/value is written at
a slot held in a device tensor, and attention reads the whole capacity under a validity mask. So the step can
be recorded once as a CUDA graph per live batch size and replayed with one launch. On the CPU (no graphs) the
step attends only over the filled slots.

With `compile` the step is first compiled by `torch.compile` (inductor by default: it fuses the ~40 small
elementwise kernels per layer — norms, rotary, softmax glue — that would otherwise dominate a small model's
graph-replayed step), then captured. Compiled steps always attend over the full capacity (fixed shapes).

The forward is `llama_step.decode` (the model's own modules, only the attention glue re-implemented, for the
Llama / Qwen2 / Qwen3 layout; the step server's pool uses it too). Prefill runs the model's normal forward (once
per distinct prompt), then copies the keys/values in.
Tests compare its logits with the dynamic-cache stream.
"""

from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager

import torch

from ...errors import PocketLMError
from ...moe.row_adapters import PERSONAL, adapter_rows
from .llama_step import causal_bias, decode, static_unsupported, store_prefill
from .prefill import adapter_flags, check_prompts, prefill_each

__all__ = ["StaticLMStream", "static_unsupported"]

log = logging.getLogger(__name__)

# one capture at a time in the process (the overlapped cloud step captures in a worker thread); captures are
# also thread-local, so the other thread's ordinary work (allocations, syncs) does not break them
_CAPTURE_LOCK = threading.Lock()


@contextmanager
def _no_recompile(compiled: bool):
    """Inside a capture a compiled step must hit its cache: a recompile there would run compile-time kernels
    (and RNG) in the capture. Raises instead (torch >= 2.6; older versions run as before)."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        with torch.compiler.set_stance("fail_on_recompile"):
            yield
    else:
        yield


class StaticLMStream:
    """Same interface as `LMStream` (prefill / step / keep / release), fixed-shape decode steps.

    Buffers persist across `prefill()` calls while the new batch fits (rows and capacity), so captured graphs
    are reused by the next generation with the same live batch size.
    """

    def __init__(self, model, pad_id: int = 0, *, graphs: bool | None = None, headroom: int = 256,
                 compile: bool | str = False):
        why = static_unsupported(model)
        if why:
            raise PocketLMError(f"static KV decoding does not support {why}; use kv='dynamic'")
        self.model, self.pad_id = model, pad_id
        self.inner = model.model
        self.device = next(model.parameters()).device
        self.graphs_enabled = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs_enabled and self.device.type != "cuda":
            raise PocketLMError("CUDA graphs need a CUDA device")
        self.headroom = headroom  # decode slots reserved past the longest prompt (grows if exceeded)
        attn0 = self.inner.layers[0].self_attn
        cfg = model.config
        self.head_dim = attn0.head_dim
        self.kv_heads = cfg.num_key_value_heads
        self.groups = cfg.num_attention_heads // cfg.num_key_value_heads
        self.dtype = self.inner.embed_tokens.weight.dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.capacity = self.max_rows = 0
        self.n = 0          # live rows
        self.length = 0     # next write slot (same for every row: rows are left padded)
        self.forwards = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.use_adapters = False  # this generation switches the model's adapters per row (eager steps)
        self.compiled = bool(compile)
        self._step_fn = self._decode
        if compile:
            backend = "inductor" if compile is True else compile
            # no shape padding: its pass benchmarks padded matmuls on `randn` inputs at compile time, and any
            # CUDA RNG use while another stream captures raises "Offset increment outside graph capture"
            options = {"shape_padding": False} if backend == "inductor" else None
            self._step_fn = torch.compile(self._decode, dynamic=False, backend=backend, options=options)

    @property
    def rows(self) -> int:
        return self.n

    # -- buffers -------------------------------------------------------------------------------
    def _allocate(self, rows: int, capacity: int) -> None:
        layers = len(self.inner.layers)
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        kw = dict(dtype=self.dtype, device=self.device)
        self.k = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.v = [torch.zeros(shape, **kw) for _ in range(layers)]
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=self.device)
        self.pos = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self.adapters = torch.full((rows,), PERSONAL, dtype=torch.long, device=self.device)  # per-row mode
        self.capacity, self.max_rows = capacity, rows
        self._graphs.clear()  # they point at the old buffers

    def _fits(self, rows: int, capacity: int) -> bool:
        return bool(self.k) and rows <= self.max_rows and capacity <= self.capacity

    def _grow(self) -> None:
        """Out of slots mid-generation: double the capacity, keep the contents (graphs are re-captured)."""
        old_k, old_v, old_valid, old_pos, old_adapters = self.k, self.v, self.valid, self.pos, self.adapters
        n, cap = self.n, self.capacity
        self._allocate(self.max_rows, 2 * cap)
        for dst, src in zip(self.k + self.v, old_k + old_v, strict=True):
            dst[:, :, :cap].copy_(src)
        self.valid[:, :cap].copy_(old_valid)
        self.pos.copy_(old_pos)
        self.adapters.copy_(old_adapters)
        self.n = n
        log.debug("static KV cache grown to %d slots", self.capacity)

    def reserve(self, new_tokens: int) -> None:
        """Decode slots to allocate past the longest prompt at the next prefill (sized once, grows if exceeded)."""
        self.headroom = new_tokens

    # -- prefill -------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None,
                adapters: list[int] | None = None) -> torch.Tensor:
        """Run the prompts with the model's own forward; return last-position logits `[B, V]`. `adapters[i]`:
        prompt i's rows run in that row mode (moe.row_adapters: PERSONAL, the default; BASE; SHARED)."""
        check_prompts(prompts)
        expand = list(range(len(prompts))) if expand is None else list(expand)
        width = max(len(p) for p in prompts)
        flags = adapter_flags(adapters, len(prompts), self.device)
        caches, logits = prefill_each(self.model, prompts, flags, self.device)
        self.forwards += len(prompts)
        rows, need = len(expand), width + self.headroom
        if not self._fits(rows, need):
            self._allocate(max(rows, self.max_rows), max(need, self.capacity))
        self.valid.zero_()
        for j, e in enumerate(expand):
            lo = width - len(prompts[e])
            store_prefill(caches[e], self.k, self.v, j, lo)
            self.valid[j, lo:width] = True
            self.pos[j] = len(prompts[e]) - 1
            self.adapters[j] = PERSONAL if flags is None else flags[e]
        self.use_adapters = flags is not None
        self.n, self.length = rows, width
        return torch.cat(logits)[torch.tensor(expand, device=self.device)]

    # -- decode --------------------------------------------------------------------------------
    def _decode(self, n: int, span: int) -> torch.Tensor:
        """One token for the first `n` rows from the static buffers; attention over slots [0, span)."""
        self.valid[:n].index_fill_(1, self.slot, True)
        bias = torch.zeros(n, 1, 1, span, dtype=torch.float32, device=self.device)
        bias = bias.masked_fill(~self.valid[:n, None, None, :span], float("-inf"))

        def write(i, k, v):
            keys, values = self.k[i][:n], self.v[i][:n]
            keys.index_copy_(2, self.slot, k)
            values.index_copy_(2, self.slot, v)
            return keys[:, :, :span], values[:, :, :span]

        return decode(self.model, self.ids[:n], self.pos[:n].view(n, 1), bias, write, self.kv_heads)[:, -1, :]

    def _graph(self, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The captured step for `n` live rows (captured on first use). Warm-up and capture run the very step
        about to be replayed (same inputs, same slot), so they change nothing the replay would not."""
        if n not in self._graphs:
            with _CAPTURE_LOCK:
                self._capture(n)
        return self._graphs[n]

    def _capture(self, n: int) -> None:
        """Warm up, then capture, on a side stream. Two failure modes a real H200 showed are avoided by design:

        - `use_count > 0` INTERNAL ASSERT in the caching allocator: a capture that joins a shared memory pool
          after every graph holding it was destroyed (the graphs are dropped whenever the buffers are
          reallocated, e.g. a longer generation than the last) while a block of it is still alive. Each graph
          now owns its private pool, released with the graph.
        - `Offset increment outside graph capture`: CUDA RNG use while a capture is active (inductor's compile
          benchmarking on `randn` when the compiled step was first traced inside the capture, or sampling on
          another thread). The compiled step is compiled and run to a steady state before capture (no shape
          padding, see __init__); a recompile inside the capture fails instead of compiling there; captures
          and first compiled calls hold one process-wide lock.

        capture_begin/capture_end run in try/finally, so a failed capture ends cleanly and the caller's stream is
        current again (`torch.cuda.graph` leaves its capture stream current when capture_begin raises)."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2 if self.compiled else 1):  # compiled: trace + compile, then one steady-state call
                self._step_fn(n, self.capacity)
        torch.cuda.synchronize(self.device)
        gc.collect()  # no garbage collection (and its frees) in the middle of the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side), _no_recompile(self.compiled):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                out = self._step_fn(n, self.capacity)
            finally:
                graph.capture_end()
        current.wait_stream(side)
        self._graphs[n] = (graph, out)
        log.debug("captured a CUDA graph for %d rows (%d slots)", n, self.capacity)

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the next-token logits `[B, V]`."""
        n = self.n
        if self.length >= self.capacity:
            self._grow()
        self.ids[:n, 0].copy_(token_ids.view(-1), non_blocking=True)
        self.pos[:n].add_(1)
        self.slot.fill_(self.length)
        graph = None
        if self.graphs_enabled and not self.use_adapters:  # per-row adapters index on the host: no graphs
            try:
                graph, out = self._graph(n)
            except RuntimeError as e:  # e.g. a custom MLP that synchronises: keep decoding, eagerly
                failure = str(e).splitlines()[0] if str(e) else type(e).__name__
                graph = None
            if graph is None:
                log.warning("CUDA graph capture failed (%s); this stream decodes without graphs", failure)
                self.graphs_enabled, self._graphs = False, {}
                torch.cuda.synchronize(self.device)
        if graph is not None:
            graph.replay()
            logits = out.clone()  # the graph's output buffer is overwritten by the next replay
        elif self.compiled and self.device.type == "cuda":
            with _CAPTURE_LOCK, adapter_rows(self.model, self.adapters[:n] if self.use_adapters else None):
                logits = self._step_fn(n, self.capacity)  # a first call compiles: never while another captures
        else:
            with adapter_rows(self.model, self.adapters[:n] if self.use_adapters else None):
                logits = self._step_fn(n, self.capacity if self.compiled else self.length + 1)
        self.length += 1
        self.forwards += 1
        return logits

    @torch.inference_mode()
    def extend(self, token_ids: torch.Tensor) -> list[torch.Tensor]:
        """Append `T` tokens per row (`[n, T]`) in one eager forward (a speculative draft being scored); the
        next-token logits after each, `T` x `[n, V]`. Rows write slots [length, length + T) side by side."""
        n, t = self.n, token_ids.shape[1]
        while self.length + t > self.capacity:
            self._grow()
        lo, span = self.length, self.length + t
        ids = token_ids.to(self.device).view(n, t)
        positions = self.pos[:n].view(n, 1) + torch.arange(1, t + 1, device=self.device)
        self.valid[:n, lo:span] = True
        bias = causal_bias(self.valid[:n, :span], torch.full((n,), lo, device=self.device), t)

        def write(i, k, v):
            self.k[i][:n, :, lo:span] = k
            self.v[i][:n, :, lo:span] = v
            return self.k[i][:n, :, :span], self.v[i][:n, :, :span]

        with adapter_rows(self.model, self.adapters[:n] if self.use_adapters else None):
            logits = decode(self.model, ids, positions, bias, write, self.kv_heads)
        self.pos[:n] += t
        self.length = span
        self.forwards += 1
        return list(logits.unbind(1))

    def rewind(self, drop: torch.Tensor) -> None:
        """Forget the last `drop[i]` tokens of row i: their slots become invalid (the shapes stay fixed, so
        captured graphs stay valid) and the row's next token takes the position after what it kept."""
        drop = drop.to(self.device)
        cols = torch.arange(self.capacity, device=self.device).unsqueeze(0)
        kill = (cols >= self.length - drop.unsqueeze(1)) & (cols < self.length)
        self.valid[: self.n] &= ~kill
        self.pos[: self.n] -= drop

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) the given live rows."""
        rows = rows.to(self.device)
        n = rows.numel()
        if n == self.n and torch.equal(rows, torch.arange(n, device=self.device)):
            return
        if n > self.max_rows:
            raise PocketLMError(f"keep() of {n} rows exceeds the {self.max_rows} allocated")
        with torch.inference_mode():
            for t in self.k + self.v + [self.valid, self.pos, self.adapters]:
                t[:n].copy_(t.index_select(0, rows))
        self.n = n

    def release(self) -> None:
        """End the generation; the buffers (and graphs) stay for the next one that fits."""
        self.n = 0
