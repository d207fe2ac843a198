"""Flower ClientApp: one CoMiGS device per SuperNode. Thin: messages in, `task.Node` does the work, records out.

Only the shared-role tensors (generalist + attention LoRA under 1g1s) leave in the reply's ArrayRecord;
specialists, router and optimizer state stay in the node's private state directory.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from ...errors import PocketLMError
from . import task
from .strategy import ARRAYS, CONFIG, FINAL_ACTION, INFO, METRICS

LEGACY_IN = "fitins.parameters"   # how the SecAgg+ workflow sends the arrays (Flower's legacy FitIns layout)


def privacy_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's own mods, chosen by the run config: SecAgg+ masking or client-side DP clipping (train messages
    only: they are what uploads)."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    _, fl = task.settings(context.run_config)
    if fl.secagg:
        return secaggplus_mod(msg, context, call_next)
    if fl.dp == "client":
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def audit_mod(msg: Message, context: Context, call_next) -> Message:
    """With node config `audit-log=FILE`: append the name of every record and key this device sends."""
    out = call_next(msg, context)
    path = context.node_config.get("audit-log")
    if path and not out.has_error():
        c = out.content
        line = {"type": msg.metadata.message_type, "round": msg.metadata.group_id,
                "arrays": {k: list(r.keys()) for k, r in c.array_records.items()},
                "configs": {k: list(r.keys()) for k, r in c.config_records.items()},
                "metrics": {k: list(r.keys()) for k, r in c.metric_records.items()}}
        with open(str(path), "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    return out


app = ClientApp(mods=[audit_mod, privacy_mod])      # audit_mod is outermost: it sees what really leaves
resources = task.Resources()   # this app's loaded base, data and model views (Flower may reuse the process)


def _node(context: Context) -> task.Node:
    return task.Node(task.node_setup(context.run_config, context.node_config, resources), resources)


@app.train()
def train(msg: Message, context: Context) -> Message:
    node = _node(context)
    if LEGACY_IN in msg.content.array_records:      # SecAgg+: names travel in the config, arrays in order
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        names = str(fitins.config["names"]).split("\n")
        arrays = parameters_to_ndarrays(fitins.parameters)
        upload, metrics = node.train({n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)},
                                     order=names, server_round=int(fitins.config.get("server-round", 0)))
        if list(upload) != names:
            raise PocketLMError("secure aggregation needs every device to hold the same shared tensors; "
                                     f"{node.setup.user} holds {len(upload)} of {len(names)}")
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([t.numpy() for t in upload.values()]),
                     int(metrics["num-examples"]), {"user": node.setup.user, "train-loss": metrics["train-loss"]})
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)
    received = msg.content.array_records[ARRAYS]
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    upload, metrics = node.train(received.to_torch_state_dict(), order=list(received.keys()),
                                 server_round=int(config.get("server-round", 0)))
    return Message(RecordDict({ARRAYS: ArrayRecord(upload), METRICS: MetricRecord(metrics),
                               INFO: ConfigRecord({"user": node.setup.user})}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    node = _node(context)
    out = node.evaluate(msg.content.array_records[ARRAYS].to_torch_state_dict())
    return Message(RecordDict({METRICS: MetricRecord(out), INFO: ConfigRecord({"user": node.setup.user})}),
                   reply_to=msg)


@app.query(FINAL_ACTION)
def keep_global(msg: Message, context: Context) -> Message:
    """The server's final average after a run's last round: kept in the private state directory (nothing is sent
    back but the user's name and whether it was kept)."""
    node = _node(context)
    config = msg.content.config_records.get(CONFIG, ConfigRecord())
    kept = node.keep_global(msg.content.array_records[ARRAYS].to_torch_state_dict(),
                            int(config.get("server-round", 0)))
    return Message(RecordDict({INFO: ConfigRecord({"user": node.setup.user, "kept": kept})}), reply_to=msg)
