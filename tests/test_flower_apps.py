"""The Flower ServerApp and ClientApp in one process (an in-process Grid, no network): CoMiGS over Flower gives
the in-process simulation's result, heterogeneous devices work, nothing private is ever sent, bad setups fail
clearly, and the privacy add-ons (SecAgg+, DP) do what they claim."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from flwr.app import Context, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flower_local import LocalGrid  # noqa: E402
from pocketlm.collab import Workspace, load_config, run_strategy  # noqa: E402
from pocketlm.collab.flower import client_app, server_app  # noqa: E402
from pocketlm.collab.flower.task import ConfigError, settings  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402

TRAIN = {"model": "tiny-llama", "max_chars": None, "rounds": 2, "local_steps": 2, "batch_size": 2, "seq_len": 16,
         "router_every": 2, "router_steps": 1, "seed": 0}
USERS = ["alice", "bob", "carol"]


def run_config(folder_corpus, tmp_path, **extra) -> dict:
    rc = {**TRAIN, "max_chars": "none", "corpus": str(folder_corpus), "out_dir": str(tmp_path / "out" / "{strategy}"),
          "state-root": str(tmp_path / "state"), "min-available-nodes": 3, "min-train-nodes": 3,
          "fraction-evaluate": 0.0}
    rc.update(extra)
    return rc


def run_flower(rc: dict, nodes: int = 3, sent=None) -> LocalGrid:
    grid = LocalGrid(client_app.app, {i + 1: {"partition-id": i} for i in range(nodes)}, rc, sent=sent)
    server_app.app(grid, Context(1, 0, {}, RecordDict(), rc))
    return grid


def simulate(folder_corpus, tmp_path, **over):
    cfg = load_config(None, {**TRAIN, "corpus": str(folder_corpus), "out_dir": str(tmp_path / "sim"), **over})
    return run_strategy(Workspace.load(cfg), cfg.strategy, cfg=cfg)


def node_params(tmp_path, user) -> dict[str, torch.Tensor]:
    meta = json.loads((tmp_path / "state" / user / "device.json").read_text())
    tensors = load_file(str(tmp_path / "state" / user / meta["tensors"]))
    return {k[len("params."):]: t for k, t in tensors.items() if k.startswith("params.")}


def assert_close_states(a: dict, b: dict, atol=1e-5):
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n].float(), b[n].float(), atol=atol, rtol=1e-4, msg=n)


def test_flower_rounds_equal_the_in_process_simulation_with_heterogeneous_devices(folder_corpus, tmp_path):
    sim = simulate(folder_corpus, tmp_path, experts=[3, 2, 1])
    sent = []
    run_flower(run_config(folder_corpus, tmp_path, experts="3,2,1"), sent=sent)
    glob = load_file(str(tmp_path / "out" / "1g1s" / "global.safetensors"))
    assert_close_states(glob, sim.server.global_state)
    for user in USERS:
        mine = node_params(tmp_path, user)
        # private tensors: what the device trained; shared ones: its last upload (the simulation's device holds the
        # average after the round, so compare private roles there and the global state above)
        private = {n for n in mine if param_role(n) in ("specialist", "router")}
        assert private == {n for n in sim.devices[user].params if param_role(n) in ("specialist", "router")}
        assert_close_states({n: mine[n] for n in private}, {n: sim.devices[user].params[n].detach() for n in private})
    # nothing private ever left a node: not as an array, not as a key anywhere in a reply
    for reply in sent:
        for rec in reply.content.array_records.values():
            assert {param_role(n) for n in rec} <= {"generalist", "attn_lora"}
        text = repr([dict(r) for r in reply.content.config_records.values()]) + \
            repr([dict(r) for r in reply.content.metric_records.values()])
        assert "router" not in text and ".experts.1" not in text


def test_a_restarted_run_resumes_every_device_from_its_private_state(folder_corpus, tmp_path):
    rc = run_config(folder_corpus, tmp_path, rounds=1)
    run_flower(rc)
    first = node_params(tmp_path, "alice")
    run_flower(rc)     # a new run: the devices continue (step counters go on), they do not start over
    meta = json.loads((tmp_path / "state" / "alice" / "device.json").read_text())
    assert meta["step"] == 2 * TRAIN["local_steps"] and meta["rounds_done"] == 2
    second = node_params(tmp_path, "alice")
    assert any(not torch.equal(first[n], second[n]) for n in first if param_role(n) == "specialist")


def test_unknown_run_config_key_is_a_clear_error(folder_corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown run-config key 'nonsense'"):
        settings({**run_config(folder_corpus, tmp_path), "nonsense": 1})
    with pytest.raises(ConfigError, match="dp must be"):
        settings({**run_config(folder_corpus, tmp_path), "dp": "maybe"})
