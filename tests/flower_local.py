"""An in-process Flower Grid for tests: messages go straight to a ClientApp object (no network, no Ray), so the
real ServerApp / strategy / ClientApp code runs in one process in a few seconds."""

from __future__ import annotations

import copy
import itertools
import json

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_ids = itertools.count(1)


def as_server_process(run_id: int = 1) -> None:
    """The identity a ServerApp process has (Flower's `Message(...)` reads it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0


class LocalGrid(Grid):
    """Nodes are `{node_id: node_config}`; each keeps its own `Context.state` for the run, like a SuperNode."""

    def __init__(self, client_app, nodes: dict[int, dict], run_config: dict, *, run_id: int = 1, sent=None):
        self.app, self.run_config, self.run_id = client_app, dict(run_config), run_id
        self.contexts = {nid: Context(run_id, nid, dict(cfg), RecordDict(), dict(run_config))
                         for nid, cfg in nodes.items()}
        self.sent = sent if sent is not None else []     # every reply a node produced, for inspection
        self.down: set[int] = set()
        as_server_process(run_id)

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self):
        return [n for n in self.contexts if n not in self.down]

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
            nid = msg.metadata.dst_node_id
            if nid in self.down:
                continue
            reply = self.app(copy.deepcopy(msg), self.contexts[nid])   # each node gets its own copy, as on a wire
            self.sent.append(reply)
            replies.append(reply)
        return replies


# -- shared by the Flower test files -------------------------------------------------------------------------
TRAIN = {"model": "tiny-llama", "max_chars": None, "rounds": 2, "local_steps": 2, "batch_size": 2, "seq_len": 16,
         "router_every": 2, "router_steps": 1, "seed": 0}
USERS = ["alice", "bob", "carol"]


def run_config(corpus, tmp_path, **extra) -> dict:
    """A Flower run config for the tiny setup (what `[tool.flwr.app.config]` + `--run-config` give a run)."""
    rc = {**TRAIN, "max_chars": "none", "corpus": str(corpus), "out_dir": str(tmp_path / "out" / "{strategy}"),
          "state-root": str(tmp_path / "state"), "min-available-nodes": 3, "min-train-nodes": 3,
          "fraction-evaluate": 0.0}
    rc.update(extra)
    return rc


def simulate(corpus, tmp_path, **over):
    """The in-process simulation with the same settings (the reference a Flower run must reproduce)."""
    from pocketlm.collab import Workspace, load_config, run_strategy

    cfg = load_config(None, {**TRAIN, "corpus": str(corpus), "out_dir": str(tmp_path / "sim"), **over})
    return run_strategy(Workspace.load(cfg), cfg.strategy, cfg=cfg)


def node_params(state_dir) -> dict:
    """The adapters a node keeps on its disk."""
    from pathlib import Path

    from safetensors.torch import load_file

    meta = json.loads((Path(state_dir) / "device.json").read_text())
    tensors = load_file(str(Path(state_dir) / meta["tensors"]))
    return {k[len("params."):]: t for k, t in tensors.items() if k.startswith("params.")}


def assert_close_states(a: dict, b: dict, atol=1e-5) -> None:
    import torch

    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(a[n].float(), b[n].float(), atol=atol, rtol=1e-4, msg=n)


def assert_matches_simulation(sim, global_state: dict, state_dirs: dict) -> None:
    """Global shared tensors equal the simulation's server; each device's private tensors equal its device's."""
    from pocketlm.moe import param_role

    assert_close_states(global_state, sim.server.global_state)
    for user, sdir in state_dirs.items():
        mine = node_params(sdir)
        private = {n for n in mine if param_role(n) in ("specialist", "router")}
        assert private == {n for n in sim.devices[user].params if param_role(n) in ("specialist", "router")}
        assert_close_states({n: mine[n] for n in private}, {n: sim.devices[user].params[n].detach() for n in private})
