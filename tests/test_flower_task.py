"""The Flower task code keeps no module-level state: what a process loads once (base, users' tokens, model
views) lives in a `Resources` object the app owns and passes in, and a node's round is built from the
simulation's own pieces."""

from __future__ import annotations

import torch

from pocketlm.collab.flower import task
from pocketlm.moe import param_role

TRAIN = {"model": "tiny-llama", "max_chars": "none", "rounds": 1, "local_steps": 1, "batch_size": 2,
         "seq_len": 16, "router_every": 1, "router_steps": 1, "seed": 0}


def _run_config(corpus, tmp_path) -> dict:
    return {**TRAIN, "corpus": str(corpus), "out_dir": str(tmp_path / "out" / "{strategy}"),
            "state-root": str(tmp_path / "state")}


def test_resources_are_per_object_and_loaded_once(folder_corpus, tmp_path):
    rc = _run_config(folder_corpus, tmp_path)
    res, other = task.Resources(), task.Resources()
    cfg, _ = task.settings(rc)
    assert res.base(cfg) is res.base(cfg) and res.base(cfg)[0] is not other.base(cfg)[0]
    a = task.Node(task.node_setup(rc, {"partition-id": 0}, res), res)
    b = task.Node(task.node_setup(rc, {"partition-id": 1}, res), res)
    assert a.model is b.model                        # one model view per expert count in this process
    assert not [k for k, v in vars(task).items() if isinstance(v, dict) and k[:1] == "_" and k[:2] != "__"]


def test_a_node_starts_from_the_initial_adapters_whatever_the_view_served_last(folder_corpus, tmp_path):
    rc = _run_config(folder_corpus, tmp_path)
    res = task.Resources()
    cfg, _ = task.settings(rc)
    first = task.Node(task.node_setup(rc, {"partition-id": 0}, res), res)
    first.train(task.initial_global_state(cfg, res))
    fresh = task.Node(task.node_setup(rc, {"partition-id": 1}, res), res)
    _, init = res.model_for(cfg, fresh.setup.strategy, fresh.setup.experts)
    assert all(torch.equal(fresh.device.params[n], t) for n, t in init.items())
    assert {param_role(n) for n in fresh.shared_names()} == {"generalist", "attn_lora"}
