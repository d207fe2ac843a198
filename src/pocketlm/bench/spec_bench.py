"""`pocketlm bench spec`: steered decoding over a simulated WAN, with and without speculation, in one run.

The cloud runs as a `pocketlm serve` child process; the device reaches it through `serve.wan.DelayProxy`, which
holds every chunk of bytes for RTT/2 in each direction (a round trip costs one RTT; with `--mbit` each direction
also serialises its bytes at that rate). With several downlink formats (`--cloud-format f32,topk:32`) every
configuration runs in each format back to back (one engine per format), so formats compare under the same machine
conditions, and a format's tokens are checked against the first format's. For each RTT the same
prompts are decoded (greedy) by: the cloud alone, closed_form without speculation, closed_form with
`--speculate K` for each K, and SpecSteer. One record per configuration: tok/s, tokens per cloud round trip,
acceptance, bytes up/down per token, whether the tokens equal the non-speculative run of the same method, and
whether the device's next draft overlapped the verify in flight.

A CPU cloud is slower than a GPU one, so the JSON also carries a projection to a cloud step of 5, 20 and 50 ms:
per generated token, non-speculative steering costs RTT + max(cloud step, device step) (the device steps while
the answer travels); a speculative round costs K' device steps (drafting, K' = the mean drafted length) +
RTT + one cloud step (a GPU verifies a short draft in about one decode step: decoding is memory-bound) and
yields the measured tokens per round trip. Device step times and tokens per round trip are this run's.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import ExitStack
from urllib.parse import urlsplit

from ..errors import PocketLMError
from ..models.quantize import quantize_device_model
from ..progress import progress
from ..serve.wan import DelayProxy
from ..steer import SteerEngine, SteerRequest, get_method
from ..steer.cloud.remote import RemoteCloud, RemoteTopK
from ..steer.cloud.wire import TOPK, topk_of
from ..steer.downlink.certify import DownlinkStats
from ..steer.engine import chat_ids
from ..steer.speculative import Speculation
from .geometries import load_bench_model
from .serve_bench import ServerProcess

log = logging.getLogger(__name__)

PROMPTS = [
    ("Write two sentences about how to spend a free Sunday.", "I am a retired sailor. I love the sea and early mornings."),
    ("Give me three tips for a short presentation.", "I teach chemistry to teenagers and like concrete examples."),
    ("Describe a good breakfast.", "I bake bread every morning and prefer simple food."),
    ("Suggest a name for a small boat.", "My grandmother was called Marta; I sail on a lake in the north."),
]
PROJECTED_CLOUD_MS = (5.0, 20.0, 50.0)


def _configs(ks: list[int], kappa: float, ahead: bool = False) -> list[tuple[str, str, int, bool]]:
    """(label, method, K, draft ahead) in run order; K = 0: no speculation (SpecSteer always drafts its own 4).
    `ahead`: each speculative configuration also with the next draft written during the verify."""
    closed = f"closed_form@{kappa:g}"
    out = [("cloud", "cloud", 0, False), ("closed_form", closed, 0, False)]
    for k in ks:
        out += [(f"closed_form/spec{k}", closed, k, False)] + ([(f"closed_form/spec{k}/ahead", closed, k, True)]
                                                                if ahead else [])
    out += [("specsteer", "specsteer", 0, False)] + ([("specsteer/ahead", "specsteer", 0, True)] if ahead else [])
    return out


def _client(url: str, tok, fmt: str):
    if fmt.startswith(TOPK):
        k, ask = topk_of(fmt)
        return RemoteTopK(url, tokenizer=tok, k=k, ask=ask, timeout=600)
    return RemoteCloud(url, tokenizer=tok, format=fmt, timeout=600)


def _decode(engine, proxy, reqs, method: str, tokens: int) -> dict:
    """One configuration over every prompt (one generate per prompt, batch 1): tokens, wall time, traffic."""
    proxy.reset_counts()
    made, wall, ids, spec_stats, device_s, device_calls = 0, 0.0, [], [], 0.0, 0
    downlink = DownlinkStats()
    for r in reqs:
        t0 = time.perf_counter()
        out = engine.generate([r], [get_method(method)], max_new_tokens=tokens)
        wall += time.perf_counter() - t0
        made += len(out[0].token_ids)
        ids.append(out[0].token_ids)
        device_s += out.stats.timings.get("device", 0.0)
        device_calls += out.stats.calls.get("device", 0)
        if out.stats.speculation:
            spec_stats.append(out.stats.speculation)
        if out.stats.downlink:
            downlink.add(out.stats.downlink)  # reads its own fields, skips the derived share
    counts = proxy.counts()
    drafted = sum(s["drafted"] for s in spec_stats)
    ahead_rounds = sum(s.get("ahead_rounds", 0) for s in spec_stats)
    trips = sum(s["row_round_trips"] for s in spec_stats)
    rounds = sum(s["rounds"] for s in spec_stats)
    return {"tokens": made, "wall_s": wall, "ids": ids,
            "tok_s": made / wall if wall else None,
            "tokens_per_round_trip": (sum(s["tokens"] for s in spec_stats) / trips) if trips else 1.0,
            "acceptance": (sum(s["accepted"] for s in spec_stats) / drafted) if drafted else None,
            "drafted_per_round": drafted / rounds if rounds else 0.0,
            "ahead_hit_rate": (sum(s["ahead_hits"] for s in spec_stats) / ahead_rounds) if ahead_rounds else None,
            "deferred": sum(s.get("deferred", 0) for s in spec_stats),  # bonus positions left to the next round
            "deferred_hits": sum(s.get("deferred_hits", 0) for s in spec_stats),
            "bytes_up_per_token": counts["bytes_up"] / made if made else None,
            "bytes_down_per_token": counts["bytes_down"] / made if made else None,
            "messages_up": counts["messages_up"],
            "device_step_ms": 1000 * device_s / device_calls if device_calls else None,
            "downlink": downlink.as_dict() if downlink.rows else None}


def _measure(engines: dict, proxy, reqs, cfg, tokens: int, rtt: int, refs: dict, repeats: int) -> list[dict]:
    """One configuration in every format, `repeats` times interleaved (f32, topk, f32, topk, ...): per format the
    run with the median tok/s (every run's tok/s in `tok_s_runs`); `identical` when every run's tokens equal the
    reference (the first format's non-speculative run of the method; SpecSteer: its own run without drafting
    ahead, since its drafts decide its text)."""
    label, method, k, drafts_ahead = cfg
    runs: dict[str, list[dict]] = {f: [] for f in engines}
    for _ in range(repeats):
        for f, engine in engines.items():
            engine.speculation = Speculation(k, ahead=drafts_ahead)
            runs[f].append(_decode(engine, proxy, reqs, method, tokens))
    out = []
    for f, recs in runs.items():
        if (k == 0 and method != "specsteer") or (method == "specsteer" and not drafts_ahead):
            refs.setdefault(method, recs[0]["ids"])
        ref = refs.get(method)
        rec = dict(sorted(recs, key=lambda r: r["tok_s"] or 0.0)[len(recs) // 2])
        rec.update(config=label, format=f, method=method.split("@")[0], k=k if method != "specsteer" else 4,
                   rtt_ms=rtt, ahead=drafts_ahead, tok_s_runs=[r["tok_s"] for r in recs],
                   identical=all(r["ids"] == ref for r in recs) if ref is not None else None)
        rec["projected_tok_s"] = {f"{c:g}ms": _project(rec, c, rtt) for c in PROJECTED_CLOUD_MS}
        del rec["ids"]
        out.append(rec)
    return out


def _project(rec: dict, cloud_ms: float, rtt_ms: float) -> float:
    """tok/s at a cloud step of `cloud_ms` (see the module docstring)."""
    dev = rec["device_step_ms"] or 0.0
    if rec["k"] == 0 and rec["method"] != "specsteer":
        return 1000.0 / (rtt_ms + max(cloud_ms, dev))
    per_round = rec["drafted_per_round"] * dev + rtt_ms + cloud_ms
    return 1000.0 * rec["tokens_per_round_trip"] / per_round


def bench_spec(cloud: str, local: str, *, rtts: list[int], ks: list[int], tokens: int = 48, prompts: int = 3,
               kappa: float = 1.0, fmt: str = "f32", overlap: bool = True, device: str | None = None,
               dtype: str = "float32", threads: int | None = None, ahead: bool = False,
               device_quantize: str | None = None, mbit_s: float | None = None,
               cloud_quantize: str | None = None, repeats: int = 1) -> dict:
    """Records for every (RTT, configuration); see the module docstring. `mbit_s`: the link's bandwidth each way
    (None: latency only)."""
    if prompts < 1 or prompts > len(PROMPTS):
        raise PocketLMError(f"--prompts must be in 1..{len(PROMPTS)}")
    if repeats < 1:
        raise PocketLMError(f"--repeats must be >= 1, got {repeats}")
    if mbit_s is not None and not (math.isfinite(mbit_s) and mbit_s > 0):
        raise PocketLMError(f"--mbit must be a bandwidth in Mbit/s > 0, got {mbit_s!r}")
    dev_model, dev_tok = load_bench_model(local, device=device, dtype=dtype, seed=1)
    dev_model = quantize_device_model(dev_model, device_quantize)
    reqs = [SteerRequest.with_context(q, c) for q, c in PROMPTS[:prompts]]
    prompt_len = max(len(chat_ids(dev_tok, r.private)) for r in reqs)
    configs = _configs(ks, kappa, ahead)
    doc = {"cloud": cloud, "local": local, "tokens": tokens, "prompts": prompts, "kappa": kappa, "format": fmt,
           "overlap": overlap, "ahead": ahead, "dtype": dtype, "device_quantize": device_quantize,
           "cloud_quantize": cloud_quantize,
           "server_threads": threads, "mbit_s": mbit_s, "repeats": repeats,
           "records": []}
    refs: dict[str, list] = {}
    fmts = [f.strip() for f in fmt.split(",") if f.strip()]
    with ServerProcess(cloud, device=device, dtype=dtype, slots=8, max_new_tokens=tokens + 40,
                       max_prompt_tokens=prompt_len + 64, threads=threads, quantize=cloud_quantize) as server:
        where = urlsplit(server.url)
        host, port = where.hostname, where.port
        for rtt in progress(rtts, desc="bench spec: RTTs", total=len(rtts)):
            with DelayProxy(host, int(port), rtt, mbit_s=mbit_s) as proxy, ExitStack() as clients:
                # one engine per downlink format, each configuration run in every format back to back, so that
                # the formats are compared under the same machine conditions (one decodes at a time)
                engines = {}
                for f in fmts:
                    engines[f] = SteerEngine(clients.enter_context(_client(proxy.url, dev_tok, f)), dev_tok,
                                             dev_model, dev_tok, overlap=overlap)
                    engines[f].generate([reqs[0]], [get_method("cloud")], max_new_tokens=2)  # warm-up
                for cfg in configs:
                    for rec in _measure(engines, proxy, reqs, cfg, tokens, rtt, refs, repeats):
                        doc["records"].append(rec)
                        log.info("rtt %d ms %s (%s): %.2f tok/s, %.2f tokens/round trip", rtt, rec["config"],
                                 rec["format"], rec["tok_s"], rec["tokens_per_round_trip"])
                for engine in engines.values():
                    engine.close()
    return doc


def spec_table(doc: dict) -> list[list[str]]:
    """Rows for a printed table: config, RTT, tok/s, x vs closed_form at that RTT, tokens/RT, acceptance, share
    of drafts written ahead that were kept, bytes."""
    base = {(r["rtt_ms"], r.get("format")): r["tok_s"] for r in doc["records"] if r["config"] == "closed_form"}
    several = len({r.get("format") for r in doc["records"]}) > 1
    rows = []
    for r in doc["records"]:
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        hit = "-" if r.get("ahead_hit_rate") is None else f"{r['ahead_hit_rate']:.2f}"
        same = {True: "yes", False: "NO", None: "-"}[r["identical"]]
        name = f"{r['config']} [{r['format']}]" if several else r["config"]
        rows.append([name, f"{r['rtt_ms']}", f"{r['tok_s']:.2f}", f"{r['tok_s'] / base[r['rtt_ms'], r.get('format')]:.2f}x",
                     f"{r['tokens_per_round_trip']:.2f}", acc, hit, f"{r['bytes_up_per_token']:.0f}",
                     f"{r['bytes_down_per_token']:.0f}", same])
    return rows


def plot_spec(doc: dict, path) -> None:
    """tok/s against RTT, one line per configuration (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    several = len({r.get("format") for r in doc["records"]}) > 1
    for label, f in dict.fromkeys((r["config"], r.get("format")) for r in doc["records"]):
        pts = sorted((r["rtt_ms"], r["tok_s"]) for r in doc["records"] if (r["config"], r.get("format")) == (label, f))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} [{f}]" if several else label)
    ax.set_xlabel("round-trip time (ms)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"speculative steering: {doc['local']} drafting for {doc['cloud']} ({doc['format']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["bench_spec", "plot_spec", "spec_table"]
