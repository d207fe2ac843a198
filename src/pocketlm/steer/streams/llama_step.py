"""The Llama / Qwen2 / Qwen3 decode forward over a preallocated KV buffer, shared by the static stream and the
step server's pool.

Why one module: both keep keys/values in their own fixed buffers (the static stream: one write slot shared by
its left-padded rows; the pool: every slot at its own length), and both need the same forward: the model's own
modules (embeddings, norms, projections, rotary embedding, MLP — a CoMiGS mixture MLP too) with only the
attention glue re-implemented. The caller says where each layer's new keys/values go (`write`) and which cache
slots each query may read (`bias`); `T` new tokens per row go through at once (T = 1: one decode step; T > 1:
a speculative draft scored in one forward). Prefill is the model's normal forward (`prefill.prefill_one`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
_DYNAMIC_ROPE = ("dynamic", "longrope")  # inv_freq depends on the sequence length: not a fixed graph


def static_unsupported(model) -> str | None:
    """Why `model` cannot decode through this forward (None if it can)."""
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        return f"model type {cfg.model_type!r} (static KV decoding knows {', '.join(FAMILIES)})"
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return "sliding-window attention layers"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if isinstance(rope, dict) and any(k in str(rope.get("rope_type", rope.get("type", ""))) for k in _DYNAMIC_ROPE):
        return f"rope type {rope.get('rope_type')!r}"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "an unexpected module layout"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def project_qkv(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_heads: int):
    """Query / key / value `[n, heads, T, D]` from the normed hidden states `x` `[n, T, H]`, rotated."""
    n, t, d = x.shape[0], x.shape[1], attn.head_dim
    q = attn.q_proj(x).view(n, t, -1, d)
    k = attn.k_proj(x).view(n, t, kv_heads, d)
    v = attn.v_proj(x).view(n, t, kv_heads, d)
    if hasattr(attn, "q_norm"):  # Qwen3
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def attend(attn, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The attention block's output `[n, T, H]` for `T` query tokens over `keys`/`values` `[n, kv_heads, S, D]`
    under an additive `bias` `[n, 1, T, S]` (-inf where a query may not look)."""
    n, heads, t, d = q.shape
    kv_heads = keys.shape[1]
    g = heads // kv_heads
    # grouped-query attention without repeating the cache: query head j*g + r reads kv head j
    qg = q.reshape(n, kv_heads, g * t, d)
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * attn.scaling
    scores = (scores.view(n, kv_heads, g, t, -1) + bias.unsqueeze(2)).view(n, kv_heads, g * t, -1)
    probs = scores.softmax(-1).to(values.dtype)
    out = torch.matmul(probs, values)                                   # [n, kv_heads, g*T, D]
    if t > 1:
        out = out.view(n, kv_heads, g, t, d).permute(0, 3, 1, 2, 4)
    return attn.o_proj(out.reshape(n, t, heads * d))


KVWrite = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decode(model, ids: torch.Tensor, positions: torch.Tensor, bias: torch.Tensor, write: KVWrite,
           kv_heads: int) -> torch.Tensor:
    """fp32 logits `[n, T, V]` for tokens `ids` `[n, T]` at rotary `positions` `[n, T]`. `write(layer, k, v)`
    stores the new keys/values `[n, kv_heads, T, D]` and returns the keys/values `[n, kv_heads, S, D]` the
    queries attend over under `bias` `[n, 1, T, S]`."""
    m = model.model
    h = m.embed_tokens(ids)                                   # [n, T, H]
    cos, sin = m.rotary_emb(h, positions)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    for i, layer in enumerate(m.layers):
        q, k, v = project_qkv(layer.self_attn, layer.input_layernorm(h), cos, sin, kv_heads)
        keys, values = write(i, k, v)
        h = h + attend(layer.self_attn, q, keys, values, bias)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(m.norm(h)).float()


def causal_bias(valid: torch.Tensor, base: torch.Tensor, t: int) -> torch.Tensor:
    """`[n, 1, T, S]` additive bias: query j of row i sees slot s when `valid[i, s]` and `s <= base[i] + j`
    (`base`: each row's slot of its first new token; `valid` `[n, S]` includes the new tokens' slots)."""
    span = valid.shape[1]
    slots = torch.arange(span, device=valid.device)
    upto = base.view(-1, 1, 1) + torch.arange(t, device=valid.device).view(1, t, 1)   # [n, T, 1]
    ok = valid.unsqueeze(1) & (slots.view(1, 1, span) <= upto)                       # [n, T, S]
    return torch.zeros(ok.shape, dtype=torch.float32, device=valid.device).masked_fill(~ok, float("-inf")).unsqueeze(1)


def store_prefill(cache, k: list[torch.Tensor], v: list[torch.Tensor], slot: int, start: int) -> None:
    """Copy one prompt's prefilled keys/values (an HF cache of batch 1, from `prefill.prefill_one`) into row
    `slot` of every layer's buffer, from cache slot `start` on."""
    for layer in range(len(k)):
        kv = cache.layers[layer]
        n = kv.keys.shape[2]
        k[layer][slot, :, start:start + n].copy_(kv.keys[0])
        v[layer][slot, :, start:start + n].copy_(kv.values[0])
