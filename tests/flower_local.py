"""An in-process Flower Grid for tests: messages go straight to a ClientApp object (no network, no Ray), so the
real ServerApp / strategy / ClientApp code runs in one process in a few seconds."""

from __future__ import annotations

import itertools

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_ids = itertools.count(1)


class LocalGrid(Grid):
    """Nodes are `{node_id: node_config}`; each keeps its own `Context.state` for the run, like a SuperNode."""

    def __init__(self, client_app, nodes: dict[int, dict], run_config: dict, *, run_id: int = 1, sent=None):
        self.app, self.run_config, self.run_id = client_app, dict(run_config), run_id
        self.contexts = {nid: Context(run_id, nid, dict(cfg), RecordDict(), dict(run_config))
                         for nid, cfg in nodes.items()}
        self.sent = sent if sent is not None else []     # every reply a node produced, for inspection
        self.down: set[int] = set()
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0   # what a ServerApp process has

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
            reply = self.app(msg, self.contexts[nid])
            self.sent.append(reply)
            replies.append(reply)
        return replies
