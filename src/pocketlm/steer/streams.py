"""A KV-cached batch of token streams on one HF causal LM (left padding, per-row positions).

Used for the cloud (inside the in-process backend) and for the device. Several prompts are prefilled
once each and then *expanded* (the cache rows are copied) so that rows sharing a prompt — e.g. one
example decoded by several methods — pay for the prefill once. `keep()` drops finished rows.
`make_stream` picks this dynamic-cache stream or the fixed-shape `StaticLMStream`; `DeviceStreams` pairs the
device's two streams (with / without the private context) as one batched forward.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def prefill_one(model, prompt: list[int], device) -> tuple[DynamicCache, torch.Tensor]:
    """One prompt through the model's own forward: its cache and last-position logits `[1, V]` (fp32)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    pos = torch.arange(len(prompt), device=device).unsqueeze(0)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, past_key_values=DynamicCache(),
                use_cache=True, logits_to_keep=1)
    return out.past_key_values, out.logits[:, -1, :].float()


class LMStream:
    """Rows of one model decoded in lockstep: `prefill()` once, then one `step()` per generated token."""

    def __init__(self, model, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self.pos: torch.Tensor | None = None   # [B] position of the last real token
        self.forwards = 0

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        self.forwards += 1
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], expand: list[int] | None = None) -> torch.Tensor:
        """Run the prompts; return last-position logits `[B, V]` (B = len(expand) if given).

        Each distinct prompt is prefilled on its own (no padding compute: a 60-token query beside a
        1,500-token private context would otherwise cost as much as a second context), then the caches
        are joined with left padding into one batch.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        caches, logits = [], []
        for p in prompts:
            cache, last = prefill_one(self.model, p, self.device)
            caches.append(cache)
            logits.append(last)
            self.forwards += 1
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            mask[i, width - len(p):] = 1
        self.cache = caches[0] if len(caches) == 1 else _join_left_padded(caches, width)
        self.mask, self.pos = mask, mask.sum(-1) - 1
        out = torch.cat(logits)
        if expand is not None:
            self.keep(torch.tensor(expand, dtype=torch.long))
            out = out[torch.tensor(expand, dtype=torch.long, device=out.device)]
        return out

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row and return the next-token logits `[B, V]`."""
        ids = token_ids.to(self.device).view(-1, 1)
        self.mask = torch.cat([self.mask, torch.ones_like(ids)], dim=1)
        self.pos = self.pos + 1
        return self._forward(ids, self.pos.view(-1, 1))

    def reserve(self, new_tokens: int) -> None:
        """Sizing hint before prefill; a dynamic cache grows as it goes, so nothing to do."""

    def keep(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/duplicate) the given rows of the cache, mask and positions."""
        rows = rows.to(self.device)
        if self.rows == rows.numel() and torch.equal(rows, torch.arange(self.rows, device=self.device)):
            return
        self.cache.reorder_cache(rows)
        self.mask, self.pos = self.mask[rows], self.pos[rows]

    def release(self) -> None:
        self.cache = self.mask = self.pos = None


KV_MODES = ("auto", "static", "compiled", "dynamic")


def resolve_kv(model, kv: str) -> str:
    """'auto' = the static KV cache (CUDA graphs on a GPU) when the architecture allows, else the dynamic cache.
    Static is faster on a CPU too (BENCHMARKS.md), though bf16 logits differ in the last bits from HF's
    attention kernels: reproduce runs recorded with the dynamic cache with kv='dynamic'. 'compiled' is static
    with the step compiled by torch.compile before capture (minutes of compilation per live batch size)."""
    from .static_stream import static_unsupported

    if kv not in KV_MODES:
        raise ValueError(f"kv must be one of {KV_MODES}, got {kv!r}")
    if kv != "auto":
        return kv
    return "static" if static_unsupported(model) is None else "dynamic"


def make_stream(model, pad_id: int = 0, kv: str = "auto"):
    """An `LMStream` (dynamic cache) or a `StaticLMStream` (fixed shapes, graphs on CUDA)."""
    mode = resolve_kv(model, kv)
    if mode in ("static", "compiled"):
        from .static_stream import StaticLMStream

        return StaticLMStream(model, pad_id, compile=mode == "compiled")
    return LMStream(model, pad_id)


def unique_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Distinct prompts (first-seen order) and, per input, the index of its distinct prompt."""
    seen: dict[tuple[int, ...], int] = {}
    uniq, expand = [], []
    for p in prompts:
        key = tuple(p)
        if key not in seen:
            seen[key] = len(uniq)
            uniq.append(p)
        expand.append(seen[key])
    return uniq, expand


class DeviceStreams:
    """Device plain and device ctx streams: one batched forward (`fused`) or two separate ones."""

    def __init__(self, model, pad_id: int, fused: bool = True, kv: str = "auto"):
        self.fused = fused
        self.a = make_stream(model, pad_id, kv)
        self._b = self.a if fused else make_stream(model, pad_id, kv)
        self.b = self._b
        self.has_plain = self.has_ctx = False
        self.n = 0

    def reserve(self, new_tokens: int) -> None:
        self.a.reserve(new_tokens)
        self._b.reserve(new_tokens)

    def prefill(self, plain: list[list[int]] | None, ctx: list[list[int]] | None):
        self.has_plain, self.has_ctx = plain is not None, ctx is not None
        self.b = self._b
        pu, pe = unique_prompts(plain) if plain else ([], [])
        cu, ce = unique_prompts(ctx) if ctx else ([], [])
        self.n = len(pe) or len(ce)
        if self.fused or not (self.has_plain and self.has_ctx):
            stream = self.a
            logits = stream.prefill(pu + cu, pe + [len(pu) + e for e in ce])
            self.b = stream
            return self._split(logits)
        return self.a.prefill(pu, pe), self.b.prefill(cu, ce)

    def _split(self, logits):
        if self.has_plain and self.has_ctx:
            return logits[: self.n], logits[self.n:]
        return (logits, None) if self.has_plain else (None, logits)

    def step(self, ids: torch.Tensor):
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            return self._split(self.a.step(torch.cat([ids, ids]) if both else ids))
        return self.a.step(ids), self.b.step(ids)

    def keep(self, rows: torch.Tensor) -> None:
        if self.a is self.b:
            both = self.has_plain and self.has_ctx
            self.a.keep(torch.cat([rows, rows + self.n]) if both else rows)
        else:
            self.a.keep(rows)
            self.b.keep(rows)
        self.n = rows.numel()

    def release(self) -> None:
        self.a.release()
        self._b.release()


def _join_left_padded(caches: list[DynamicCache], width: int) -> DynamicCache:
    """One batch cache from single-row caches of different lengths; padding slots are zeros (masked)."""
    joined = DynamicCache()
    for layer in range(len(caches[0].layers)):
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[layer].keys, c.layers[layer].values
            pad = width - k.shape[-2]
            if pad:
                k = torch.cat([k.new_zeros(*k.shape[:-2], pad, k.shape[-1]), k], dim=-2)
                v = torch.cat([v.new_zeros(*v.shape[:-2], pad, v.shape[-1]), v], dim=-2)
            ks.append(k)
            vs.append(v)
        joined.update(torch.cat(ks), torch.cat(vs), layer)
    return joined
