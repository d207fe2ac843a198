"""Plain greedy decoding through transformers' own `generate`: its DynamicCache against its StaticCache.

On a GPU, `generate` with `cache_implementation="static"` compiles the model's forward with
`torch.compile(mode="reduce-overhead")` (CUDA graphs by inductor); on a CPU it runs the static cache eagerly.
This is the outside reference for our static stream (`steer/static_stream.py`): the GPU suite runs it on the
same cloud geometry, so the faster of the two can be kept. tok/s counts decode time only (from the first
generated token's logits to the end), as `bench_steer` does; EOS is ignored.
"""

from __future__ import annotations

import statistics
import time

import torch

from .steer_bench import QUERY


class _FirstCall:
    """A logits processor that only notes when the first decode step's logits arrive (prefill done)."""

    def __init__(self, device: torch.device):
        self.device, self.t = device, None

    def __call__(self, input_ids, scores):
        if self.t is None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.t = time.perf_counter()
        return scores


def _decode_seconds(model, ids: torch.Tensor, tokens: int, cache: str) -> float:
    from transformers import LogitsProcessorList

    first = _FirstCall(ids.device)
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([first]), **kwargs)
    if ids.device.type == "cuda":
        torch.cuda.synchronize(ids.device)
    if out.shape[1] != ids.shape[1] + tokens:
        raise RuntimeError(f"generate stopped after {out.shape[1] - ids.shape[1]} of {tokens} tokens")
    return time.perf_counter() - first.t


def bench_hf_generate(model, tokenizer, *, tokens: int = 32, repeats: int = 3) -> dict:
    """Median decode tok/s of `generate` on the dynamic and the static cache (one warm-up each, which also
    compiles on a GPU), same prompt (the decoding benchmark's query, no chat template)."""
    device = next(model.parameters()).device
    ids = tokenizer(QUERY, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    model.generation_config.eos_token_id = None
    doc = {"tokens": tokens, "repeats": repeats, "prompt_tokens": ids.shape[1], "device": str(device)}
    for cache in ("dynamic", "static"):
        _decode_seconds(model, ids, tokens, cache)  # warm-up (compilation and graph recording on a GPU)
        times = [_decode_seconds(model, ids, tokens, cache) for _ in range(repeats)]
        doc[f"{cache}_tok_s"] = (tokens - 1) / statistics.median(times)
    doc["static_vs_dynamic"] = doc["static_tok_s"] / doc["dynamic_tok_s"]
    return doc
