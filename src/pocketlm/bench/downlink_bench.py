"""Downlink benchmark: bytes per token and certification of the top-k downlink vs full f32 rows, same run.

A loopback step server (a child process, as deployed) serves the cloud; the device decodes the same requests
greedily with each method, first with full f32 rows (the reference), then with `topk:K` for each K. Per K:
tokens identical to the reference (the claim certification makes), bytes down and up per generated token (WebSocket
payloads: open, steps, `exact` answers, close), the share of steps the top-k alone certified, and how many ids per
token the device had to ask for (those ids go up: a side channel docs/architecture.md names).
"""

from __future__ import annotations

import logging

from ..models.vocab import head_rows
from ..progress import progress
from ..steer.cloud.remote import RemoteCloud, RemoteTopK
from ..steer.downlink.certify import DownlinkStats
from ..steer.engine import SteerEngine, SteerRequest, chat_ids
from ..steer.fusion.methods import parse_methods
from .geometries import GEOMETRIES, load_bench_model
from .serve_bench import ServerProcess

log = logging.getLogger(__name__)

# public query -> private context (built in, so the benchmark needs no data files)
REQUESTS = [
    ("Write a short note to a friend about the weekend plans.",
     "I am Giulia, a retired sailor from Genoa. I always answer in a cheerful tone and I love the sea and boats."),
    ("Suggest something to cook tonight.", "I am vegetarian, I live alone and I hate washing many pans."),
    ("How should I start learning a new language?", "I am a nurse on night shifts and I only have ten minutes a day."),
    ("Describe a good way to spend a rainy afternoon.", "I love old films, strong tea and knitting."),
]


def bench_downlink(cloud: str, local: str, *, ks: tuple[int, ...] = (16, 64, 256), tokens: int = 48,
                   methods: str = "closed_form,plausible,ada_costeer", device: str | None = None,
                   dtype: str = "float32") -> dict:
    geometry = cloud in GEOMETRIES or local in GEOMETRIES
    dev_model, dev_tok = load_bench_model(local, device=device, dtype=dtype, seed=1)
    ms = parse_methods(methods)
    reqs = [SteerRequest.with_context(q, c) for q, c in REQUESTS for _ in ms]
    row_methods = [m for _ in REQUESTS for m in ms]
    longest = max(len(chat_ids(dev_tok, r.query)) for r in reqs)
    doc: dict = {"cloud": cloud, "local": local, "tokens": tokens, "methods": methods, "requests": len(REQUESTS),
                 "dtype": dtype, "rows": {}}
    with ServerProcess(cloud, device=device, dtype=dtype, slots=len(reqs) + 4, max_new_tokens=tokens + 4,
                       max_prompt_tokens=longest + 16) as server:
        clients = [("f32", lambda: RemoteCloud(server.url, tokenizer=dev_tok, format="f32", timeout=600))]
        clients += [(f"topk:{k}", lambda k=k: RemoteTopK(server.url, tokenizer=dev_tok, k=k, timeout=600)) for k in ks]
        reference = None
        for name, make in progress(clients, desc="downlink formats", total=len(clients)):
            with make() as rc:
                engine = SteerEngine(rc, dev_tok, dev_model, dev_tok, slice_to_tokenizer=not geometry)
                gens, totals = [], DownlinkStats()
                for i in range(0, len(reqs), len(ms)):  # one request's methods per generate (a device batch)
                    out = engine.generate(reqs[i:i + len(ms)], row_methods[i:i + len(ms)], max_new_tokens=tokens)
                    gens += out
                    if out.stats.downlink:
                        totals.add(out.stats.downlink)
                engine.close()
                made = sum(len(g.token_ids) + (g.finish == "eos") for g in gens)
                row = doc["rows"].setdefault(name, totals.as_dict() if totals.rows else {})
                row.update(tokens=made, down_per_token=rc.bytes_down / made, up_per_token=rc.bytes_up / made,
                           messages_up=rc.messages_up)
                if reference is None:
                    reference = [g.token_ids for g in gens]
                row["identical_to_f32"] = sum(g.token_ids == r for g, r in zip(gens, reference, strict=True))
                row["generations"] = len(gens)
                if "rows" in row:
                    row["exact_ids_per_token"] = row["exact_ids"] / made
    f32 = doc["rows"]["f32"]["down_per_token"]
    for row in doc["rows"].values():
        row["down_ratio_vs_f32"] = row["down_per_token"] / f32
    doc["vocab_rows"] = head_rows(dev_model)
    return doc

