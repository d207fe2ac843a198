"""The simulation: strategies end to end on a tiny model, resume after a kill == the uninterrupted run,
heterogeneous devices, what is shared and what stays private."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_workspace
from pocketlm.collab import load_config, run_strategy
from pocketlm.moe import param_role


@pytest.fixture
def ws(folder_corpus, tmp_path):
    return tiny_workspace(folder_corpus, tmp_path)


def _params(sim):
    return {u: {n: p.detach().clone() for n, p in d.params.items()} for u, d in sim.devices.items()}


@pytest.mark.parametrize("strategy", ["1g1s", "2g", "2s", "local", "fedavg", "centralized", "pretrained"])
def test_every_strategy_runs_and_learns(ws, strategy):
    sim = run_strategy(ws, strategy)
    first, last = sim.history[0], sim.history[-1]
    assert set(last["per_user_ppl"]) == {"alice", "bob", "carol"}
    if strategy == "pretrained":
        assert len(sim.history) == 1
    else:
        assert last["round"] == 3 and last["mean_ppl"] < first["mean_ppl"]
    assert (sim.out / "history.json").is_file()


def test_sharing_follows_the_strategy(ws):
    sim = run_strategy(ws, "1g1s")
    p = _params(sim)
    a, b = p["alice"], p["bob"]
    for n in a:
        same = torch.equal(a[n], b[n])
        if param_role(n) in ("generalist", "attn_lora"):
            assert same, n            # everyone holds the server's average after the round
        elif param_role(n) == "specialist" and n.endswith("lora_B"):
            assert not same, n        # trained on private data, never averaged
    assert any(param_role(n) == "router" and not torch.equal(a[n], b[n]) for n in a)
    shared = load_file(str(sim.out / "users" / "alice" / "shared.safetensors"))
    private = load_file(str(sim.out / "users" / "alice" / "private.safetensors"))
    assert {param_role(n) for n in shared} == {"generalist", "attn_lora"}
    assert {param_role(n) for n in private} == {"specialist", "router"}


def test_fedavg_everyone_ends_equal_local_nobody(ws):
    fed = _params(run_strategy(ws, "fedavg"))
    loc = _params(run_strategy(ws, "local"))
    names = list(fed["alice"])
    assert all(torch.equal(fed["alice"][n], fed["carol"][n]) for n in names)
    assert not all(torch.equal(loc["alice"][n], loc["carol"][n]) for n in names)


def test_heterogeneous_devices_share_one_generalist(ws):
    cfg = load_config(None, {**ws.cfg.to_dict(), "experts": [3, 2, 1]})
    sim = run_strategy(ws, "1g1s", cfg=cfg)
    experts = {u: {n.split(".experts.")[1].split(".")[0] for n in d.params if ".experts." in n}
               for u, d in sim.devices.items()}
    assert experts == {"alice": {"0", "1", "2"}, "bob": {"0", "1"}, "carol": {"0"}}
    assert not any(param_role(n) == "router" for n in sim.devices["carol"].params)   # E=1: no router
    p = _params(sim)
    gen = [n for n in p["carol"] if param_role(n) == "generalist"]
    assert gen and all(torch.equal(p["alice"][n], p["carol"][n]) for n in gen)
    assert "routing" in sim.history[-1] and set(sim.history[-1]["routing"]) == {"alice", "bob"}


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(ws, tmp_path):
    full = run_strategy(ws, "1g1s", cfg=load_config(None, {**ws.cfg.to_dict(), "out_dir": str(tmp_path / "a")}))
    cfg_b = load_config(None, {**ws.cfg.to_dict(), "out_dir": str(tmp_path / "b")})
    killed = run_strategy(ws, "1g1s", cfg=cfg_b, stop_after=1)
    assert killed.round == 1
    resumed = run_strategy(ws, "1g1s", cfg=cfg_b, resume=True)
    assert resumed.round == 3
    pa, pb = _params(full), _params(resumed)
    for u in pa:
        for n in pa[u]:
            assert torch.equal(pa[u][n], pb[u][n]), (u, n)
    strip = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)


def test_resume_refuses_another_config(ws, tmp_path):
    cfg = load_config(None, {**ws.cfg.to_dict(), "out_dir": str(tmp_path / "c")})
    run_strategy(ws, "1g1s", cfg=cfg, stop_after=1)
    other = load_config(None, {**cfg.to_dict(), "lr": 1e-4})
    with pytest.raises(Exception, match="different strategy or config"):
        run_strategy(ws, "1g1s", cfg=other, resume=True)


def test_corrupt_checkpoint_is_a_clear_error(ws, tmp_path):
    cfg = load_config(None, {**ws.cfg.to_dict(), "out_dir": str(tmp_path / "d")})
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="corrupt"):
        run_strategy(ws, "1g1s", cfg=cfg, resume=True)


def test_history_json_is_complete(ws):
    sim = run_strategy(ws, "2g")
    doc = json.loads((sim.out / "history.json").read_text())
    assert doc["strategy"] == "2g" and doc["scenario"] == "id" and len(doc["history"]) == 4
    assert all("train_loss" in e for e in doc["history"][1:])
