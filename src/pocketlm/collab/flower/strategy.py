"""Flower's FedAvg, made CoMiGS-aware: per-tensor averaging over heterogeneous key sets and checked uploads.

Stock FedAvg refuses replies whose array keys differ (devices with different expert counts under `2g`) and
averages anything it is sent. Here the replies become `Upload`s for the same `Server` the in-process
simulation uses: each shared tensor is averaged (uniform or token-weighted) over the devices that hold it, and
an upload with a non-finite value, an unknown name, a wrong shape or (optionally) a change larger than
`max-update-norm` is rejected with a log line while the round goes on with the others.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from ..server import Upload
from . import task

log = logging.getLogger(__name__)

ARRAYS, CONFIG, METRICS, INFO = "arrays", "config", "metrics", "info"
FINAL_ACTION = "global"          # `query.global`: the final average goes to every node after the last round


def to_record(state) -> ArrayRecord:
    return ArrayRecord({n: t.detach().cpu().contiguous() for n, t in state.items()})


class CoMiGSFedAvg(FedAvg):
    def __init__(self, server, *, max_update_norm: float = 0.0, eval_every: int = 1, **kw):
        super().__init__(arrayrecord_key=ARRAYS, configrecord_key=CONFIG, **kw)
        self.server = server
        self.max_update_norm = max_update_norm
        self.eval_every = eval_every
        self.rejected: dict[int, dict[str, str]] = {}

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if server_round % self.eval_every:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        uploads, contents = [], {}
        for msg in valid:
            c = msg.content
            info = c.config_records.get(INFO, ConfigRecord())
            user = str(info.get("user", f"node {msg.metadata.src_node_id}"))
            if ARRAYS not in c.array_records or METRICS not in c.metric_records:
                log.warning("server: rejected the reply of %s: no %r ArrayRecord / %r MetricRecord", user, ARRAYS,
                            METRICS)
                continue
            m = c.metric_records[METRICS]
            uploads.append(Upload(user, c.array_records[ARRAYS].to_torch_state_dict(), int(m.get("train-tokens", 0))))
            contents[user] = c
        rejected = task.aggregate(self.server, uploads, self.max_update_norm)
        self.rejected[server_round] = rejected
        accepted = [c for u, c in contents.items() if u not in rejected]
        metrics = self.train_metrics_aggr_fn(accepted, self.weighted_by_key) if accepted else None
        if metrics is not None:
            metrics["accepted"], metrics["rejected"] = len(accepted), len(rejected)
        return to_record(self.server.global_state), metrics


def deliver_final(grid: Grid, arrays: ArrayRecord, server_round: int, timeout: float) -> int:
    """Send the final global state to every connected node (a device keeps it to steer with); returns how many
    nodes confirmed. A node that is gone costs at most `timeout`."""
    msgs = [Message(RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": server_round})}),
                    dst_node_id=nid, message_type=f"{MessageType.QUERY}.{FINAL_ACTION}")
            for nid in grid.get_node_ids()]
    replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
    kept = sum(1 for r in replies if not r.has_error() and r.content.config_records.get(INFO, {}).get("kept"))
    log.info("server: the final global state (round %d) went to %d node(s), %d kept it", server_round, len(msgs),
             kept)
    return kept


def metrics_of(record: MetricRecord | None) -> dict:
    return {} if record is None else {k: v for k, v in record.items()}
