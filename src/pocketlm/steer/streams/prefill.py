"""Prompt prefill shared by every in-process stream: one forward per distinct prompt, caches joined by rows.

Why its own module: both the dynamic-cache stream and the static stream prefill the same way (the model's own
forward, once per distinct prompt), and neither should import the other for it.

The cache keyword changed name in transformers (`past_key_values` -> `cache`, the old name warns since 5.2x);
`cache_kwargs` passes whichever the installed model's forward declares, so no library warning reaches a user
and older transformers (e.g. a GPU machine's preinstalled 5.17) keep working.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers import DynamicCache

from ...moe.row_adapters import adapter_rows


@functools.cache
def _cache_arg(model_class: type) -> str:
    params = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`, whichever this model's forward takes."""
    return {_cache_arg(type(model)): cache}


def output_cache(out):
    """The cache an HF forward returned, under its current or its older name (no deprecation warning)."""
    for key in ("cache", "past_key_values"):
        if key in out.keys():
            return out[key]
    return None


def forward_step(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
    """One cached forward; returns (last-position logits `[B, V]` fp32, the updated cache)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **cache_kwargs(model, cache))
    return out.logits[:, -1, :].float(), output_cache(out)


def forward_tokens(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache):
    """A cached forward of `T` tokens per row; returns (logits `[B, T, V]` fp32 after each, the updated cache)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **cache_kwargs(model, cache))
    return out.logits.float(), output_cache(out)


def prefill_one(model, prompt: list[int], device) -> tuple[DynamicCache, torch.Tensor]:
    """One prompt through the model's own forward: its cache and last-position logits `[1, V]` (fp32)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    pos = torch.arange(len(prompt), device=device).unsqueeze(0)
    logits, cache = forward_step(model, ids, torch.ones_like(ids), pos, DynamicCache())
    return cache, logits


def prefill_each(model, prompts: list[list[int]], flags: torch.Tensor | None, device):
    """Each prompt on its own through the model's forward, prompt i in row mode `flags[i]` (None: as the model
    is): (caches, last-position logits `[1, V]` each). No padding compute: a 60-token query beside a 1,500-token
    private context would otherwise cost as much as a second context."""
    caches, logits = [], []
    for i, p in enumerate(prompts):
        with adapter_rows(model, None if flags is None else flags[i:i + 1]):
            cache, last = prefill_one(model, p, device)
        caches.append(cache)
        logits.append(last)
    return caches, logits


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


def adapter_flags(adapters: list[int] | None, n: int, device) -> torch.Tensor | None:
    """Per-prompt row modes (moe.row_adapters: BASE, PERSONAL, SHARED; a bool reads as PERSONAL / BASE) as a
    long tensor (None when every row runs the model as it is)."""
    if adapters is None:
        return None
    if len(adapters) != n:
        raise ValueError(f"{len(adapters)} adapter flags for {n} prompts")
    return torch.tensor([int(a) for a in adapters], dtype=torch.long, device=device)


def check_prompts(prompts: list[list[int]]) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")


def join_left_padded(caches: list[DynamicCache], width: int) -> DynamicCache:
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
