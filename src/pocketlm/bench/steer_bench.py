"""Decoding benchmark: plain cloud greedy decoding vs each steering method, batch 1, one run.

Every configuration decodes the same query (and the same synthetic private context) through the same
engine, EOS ignored, so all produce exactly `tokens` tokens. Rounds are interleaved across configurations
(median reported), so background load hits all alike and the ratios stay meaningful on a busy machine.
tok/s counts decode time only (after prefill): (tokens - 1) forward steps plus `tokens` fusions.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import replace

from ..progress import progress
from ..steer.engine import SteerEngine, SteerRequest
from ..steer.fusion.methods import Method, get_method
from ..steer.streams.kvmode import cache_modes

log = logging.getLogger(__name__)

QUERY = "Write a short note to a friend about the weekend plans."
CONTEXT_SENTENCE = "I live by the sea, love sailing and early mornings, and write in a warm, plain style. "


def synthetic_context(tokenizer, n_tokens: int) -> str:
    """About `n_tokens` tokens of private-context text for the device tokenizer."""
    text = CONTEXT_SENTENCE
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += CONTEXT_SENTENCE
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def bench_steer(engine: SteerEngine, methods: list[Method], *, tokens: int = 32, context_tokens: int = 1024,
                repeats: int = 3, warmup_tokens: int = 4, unbatched: bool = True, overlap: bool = True,
                compare_kv: list[str] | None = None) -> dict:
    """Every row runs on the engine's KV mode (`engine.kv`, resolved), so `ratio` compares like with like.
    Extra rows: `closed_form/unbatched_device` (two device forwards per step instead of one batched),
    `closed_form/overlap` (cloud step in a worker thread — its own CUDA stream on a GPU — while the device
    streams step), and for each mode in `compare_kv` (default: the other of static / dynamic; [] for none)
    `plain/<mode>_kv` and `closed_form/<mode>_kv`: the same decoding on that cache, ratio still against this
    engine's plain row."""
    device_modes = cache_modes(engine.device_model)
    cloud_modes = engine.cloud.cache_modes()
    # modes both sides can decode with; a cloud with one mode of its own (a server) leaves the device free
    shared = [m for m in device_modes if m in cloud_modes]
    supported = shared if shared or len(cloud_modes) > 1 else list(device_modes)
    kv = device_modes[0] if engine.kv == "auto" else engine.kv
    if kv not in supported:
        kv = "dynamic"
    ctx = synthetic_context(engine.device_tok, context_tokens)
    req = SteerRequest(QUERY, f"{ctx}\n\n{QUERY}")
    cf = replace(get_method("closed_form"), name="closed_form")
    configs: list[tuple[str, Method, bool, bool, str]] = [("plain", get_method("cloud"), True, False, kv)]
    configs += [(m.name, m, True, False, kv) for m in methods]
    if unbatched:
        configs.append(("closed_form/unbatched_device", cf, False, False, kv))
    if overlap:
        configs.append(("closed_form/overlap", cf, True, True, kv))
    if compare_kv is None:
        compare_kv = ["static" if kv == "dynamic" else "dynamic"]
    compare_kv = [m for m in compare_kv if m in supported]  # a static mode cannot run on an unsupported model
    for mode in dict.fromkeys(mode for mode in compare_kv if mode != kv):
        configs += [(f"plain/{mode}_kv", get_method("cloud"), True, False, mode),
                    (f"closed_form/{mode}_kv", cf, True, False, mode)]
    times: dict[str, list[float]] = {name: [] for name, *_ in configs}
    steered: dict[str, int] = {}
    caller = engine.settings()
    for rnd in progress(range(repeats + 1), desc="steer bench rounds", total=repeats + 1):
        for name, m, fused, overlapped, mode in configs:
            engine.fuse_device_streams, engine.overlap, engine.kv = fused, overlapped, mode
            n = warmup_tokens if rnd == 0 else tokens
            out = engine.generate([req], [m], max_new_tokens=n, ignore_eos=True)
            g = out[0]
            if rnd > 0:
                times[name].append(out.stats.timings["decode_s"])
                steered[name] = g.steered_tokens
    engine.restore(caller)
    engine.close()
    tok_s = {name: (tokens - 1) / statistics.median(t) for name, t in times.items()}
    plain = tok_s.pop("plain")
    doc = {"plain_tok_s": plain, "methods": {}, "tokens": tokens, "context_tokens": len(
        engine.device_tok(ctx, add_special_tokens=False)["input_ids"]), "repeats": repeats, "batch": 1,
        "vocab_size": engine.align.size, "device": str(next(engine.device_model.parameters()).device),
        "kv": kv}
    for name, v in tok_s.items():
        doc["methods"][name] = {"tok_s": v, "ratio": v / plain, "steered_tokens": steered.get(name)}
        log.info("%s: %.2f tok/s (%.3fx plain)", name, v, v / plain)
    return doc
