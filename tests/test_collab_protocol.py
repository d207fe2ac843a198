"""The two protocols: `clean` (default) and `official` (leak, Llama gate, scoring before the average, two-expert
baselines) as one switch; both scores recorded every evaluated round; exact resume with the gate's noise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_workspace
from pocketlm.collab import ConfigError, compare, load_config, run_strategy
from pocketlm.moe import OfficialGate, mixture_layers, param_role

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = {"official_compat": True, "router": "official", "eval_at": "before_aggregation", "baseline_experts": 2}


def _keys(cfg):
    return {k: getattr(cfg, k) for k in OFFICIAL}


def test_protocol_switch_sets_four_keys_and_set_wins(tmp_path):
    assert _keys(load_config()) == {"official_compat": False, "router": "linear", "eval_at": "after_aggregation",
                                    "baseline_experts": 1}
    cfg = load_config(REPO / "configs" / "fortunes-ood.toml", ["protocol=official"])   # file says compat=false
    assert _keys(cfg) == OFFICIAL and cfg.protocol == "official"
    cfg = load_config(None, ["protocol=official", "router=linear"])
    assert cfg.router == "linear" and cfg.official_compat is True
    p = tmp_path / "x.toml"
    p.write_text('protocol = "official"\n[optim]\nofficial_compat = false\n')
    assert load_config(p).official_compat is True                                   # file < protocol
    assert load_config(p, ["protocol=clean"]).official_compat is False
    for name in ("fortunes-ood", "agnews-ood"):
        cfg = load_config(REPO / "configs" / "official" / f"{name}.toml")
        assert _keys(cfg) == OFFICIAL and cfg.scenario == "ood"


@pytest.mark.parametrize("override, message", [
    (["protocol=paper"], "protocol must be one of"),
    (["router=mlp"], "router must be one of"),
    (["eval_at=sometimes"], "eval_at must be one of"),
    (["baseline_experts=3"], "baseline_experts must be 1 or 2"),
])
def test_bad_protocol_keys_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


@pytest.fixture
def ws(folder_corpus, tmp_path):
    return tiny_workspace(folder_corpus, tmp_path, rounds=2)


def _with(ws, tmp_path, sub, **over):
    base = ws.cfg.to_dict()
    if "protocol" in over:      # let the switch set its keys (explicit values would win over it)
        base = {k: v for k, v in base.items() if k not in OFFICIAL}
    return load_config(None, {**base, "out_dir": str(tmp_path / sub), **over})


def test_both_scores_are_recorded_and_eval_at_picks_the_headline(ws, tmp_path):
    after = run_strategy(ws, "1g1s", cfg=_with(ws, tmp_path, "a"))
    before = run_strategy(ws, "1g1s", cfg=_with(ws, tmp_path, "b", eval_at="before_aggregation"))
    last_a, last_b = after.history[-1], before.history[-1]
    for e in (last_a, last_b):
        assert set(e["before_aggregation"]["per_user_ppl"]) == {"alice", "bob", "carol"}
    assert last_a["before_aggregation"] == last_b["before_aggregation"]     # same run, only the headline moves
    assert last_a["after_aggregation"] == last_b["after_aggregation"]
    assert last_a["before_aggregation"]["mean_ppl"] != last_a["after_aggregation"]["mean_ppl"]
    assert last_a["mean_ppl"] == last_a["after_aggregation"]["mean_ppl"]
    assert last_b["mean_ppl"] == last_b["before_aggregation"]["mean_ppl"]
    local = run_strategy(ws, "local", cfg=_with(ws, tmp_path, "c")).history[-1]
    assert local["before_aggregation"] == local["after_aggregation"]       # nothing averaged: one model, one score


def test_compare_json_carries_both(ws, tmp_path):
    ws.cfg = _with(ws, tmp_path, "{strategy}", eval_at="before_aggregation", rounds=1)
    doc = compare(ws, ["2g"])
    s = doc["strategies"]["2g"]
    assert s["eval_at"] == "before_aggregation" and s["mean_ppl"] == s["before_aggregation"]["mean_ppl"]
    assert set(s["after_aggregation"]) == {"per_user_ppl", "mean_ppl"}
    json.dumps(doc)


def test_two_expert_baselines_are_uniform_and_fedavg_averages_both(ws, tmp_path):
    fed = run_strategy(ws, "fedavg", cfg=_with(ws, tmp_path, "f", baseline_experts=2))
    assert {d.num_experts for d in fed.devices.values()} == {2}
    assert not any(param_role(n) == "router" for d in fed.devices.values() for n in d.params)
    a, c = fed.devices["alice"].params, fed.devices["carol"].params
    spec = [n for n in a if param_role(n) == "specialist"]
    assert spec and all(torch.equal(a[n], c[n]) for n in spec)            # the second expert is averaged too
    cen = run_strategy(ws, "centralized", cfg=_with(ws, tmp_path, "z", baseline_experts=2))
    assert [d.num_experts for d in cen.devices.values()] == [2]
    loc = run_strategy(ws, "local", cfg=_with(ws, tmp_path, "l"))
    assert {d.num_experts for d in loc.devices.values()} == {1}


def test_official_protocol_resumes_exactly(ws, tmp_path):
    """The gate's training noise draws from the global RNG: the checkpoint must carry it."""
    full = run_strategy(ws, "1g1s", cfg=_with(ws, tmp_path, "o1", protocol="official"))
    assert isinstance(mixture_layers(full.models[2])[0][1].router, OfficialGate)
    cfg = _with(ws, tmp_path, "o2", protocol="official")
    run_strategy(ws, "1g1s", cfg=cfg, stop_after=1)
    resumed = run_strategy(ws, "1g1s", cfg=cfg, resume=True)
    for u, d in full.devices.items():
        for n, p in d.params.items():
            assert torch.equal(p, resumed.devices[u].params[n]), (u, n)
    assert not list((tmp_path / "o2").glob("*.partial"))
    assert json.loads((tmp_path / "o2" / "history.json").read_text())["config"]["protocol"] == "official"
