"""Every method decodes token for token what the engine decoded before the rule/guard redesign.

`golden/steer_methods.json` was recorded with the pre-redesign engine (a method-name dispatch in one long
`generate`) on tiny random models: 13 methods x 2 requests in one mixed batch, greedy and seeded top-p
sampling, dynamic and static KV caches. Any change to a rule, the dispatch or the stream plumbing that moves a
single token fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketlm.models import build_tiny
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import Sampling, SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import parse_methods

GOLDEN = json.loads((Path(__file__).parent / "golden" / "steer_methods.json").read_text())
SECRET = "My secret passphrase is XYZZY-PLUGH and I live at 42 Quiet Lane."


@pytest.fixture(scope="module")
def models():
    cloud, tok = build_tiny("tiny-qwen2", seed=1, vocab_size=300)
    device, _ = build_tiny("tiny-llama", seed=2)
    return cloud, device, tok


@pytest.mark.parametrize("key", sorted(GOLDEN["runs"]))
def test_every_method_matches_the_recorded_tokens(models, key):
    cloud, device, tok = models
    kv, t = key.split("/t")
    sampling = Sampling() if float(t) == 0 else Sampling(temperature=float(t), top_p=0.9, seed=3)
    reqs = [SteerRequest("Write a haiku.", f"{SECRET}\n\nWrite a haiku."),
            SteerRequest("Tell me about the sea.", "ctx A\n\nTell me about the sea.")]
    ms = parse_methods(GOLDEN["methods"])
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok, kv=kv)
    gens = eng.generate([r for r in reqs for _ in ms], [m for _ in reqs for m in ms], max_new_tokens=12,
                        sampling=sampling)
    got = [[g.method, g.token_ids, g.finish, g.steered_tokens] for g in gens]
    assert got == GOLDEN["runs"][key]
