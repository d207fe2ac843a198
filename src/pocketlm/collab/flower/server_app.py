"""Flower ServerApp: CoMiGS rounds over Flower's Message API. Thin: settings in, strategy runs, results out.

Plain mode runs `CoMiGSFedAvg.start` (optionally wrapped in Flower's fixed-clipping DP strategy); `secagg = true`
runs each round through Flower's SecAgg+ workflow. The final global shared tensors and the history are written to
the run's `out_dir` (`global.safetensors`, `history.json`), then sent to every node, which keeps it to steer with.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from safetensors.torch import save_file

from . import task
from .secure import secure_round
from .strategy import INFO, METRICS, CoMiGSFedAvg, deliver_final, metrics_of, to_record

log = logging.getLogger(__name__)
app = ServerApp()


class _Strategy(CoMiGSFedAvg):
    """Keeps the server's reference state equal to what Flower sends (DP noise included) and logs per user."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.eval_ppl: dict[int, dict[str, float]] = {}
        self.train_seconds: dict[int, float] = {}

    def configure_train(self, server_round, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        self.server.global_state = arrays.to_torch_state_dict()
        self.train_seconds[server_round] = -time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies):
        out = super().aggregate_train(server_round, replies)
        self.train_seconds[server_round] += time.time()      # sampling + send + local updates + replies + average
        return out

    def aggregate_evaluate(self, server_round: int, replies):
        replies = list(replies)
        self.eval_ppl[server_round] = {
            str(m.content.config_records[INFO]["user"]): float(m.content.metric_records[METRICS]["ppl"])
            for m in replies if not m.has_error() and INFO in m.content.config_records}
        return super().aggregate_evaluate(server_round, replies)


def build_strategy(cfg, fl, server):
    strategy = _Strategy(server, max_update_norm=fl.max_update_norm, eval_every=cfg.eval_every,
                         fraction_train=fl.fraction_train, fraction_evaluate=fl.fraction_evaluate,
                         min_available_nodes=fl.min_available_nodes, min_train_nodes=fl.min_train_nodes,
                         min_evaluate_nodes=fl.min_evaluate_nodes)
    wrap = {"server": DifferentialPrivacyServerSideFixedClipping,
            "client": DifferentialPrivacyClientSideFixedClipping}.get(fl.dp)
    if wrap is None:
        return strategy, strategy
    return wrap(strategy, fl.dp_noise_multiplier, fl.dp_clipping_norm, fl.min_train_nodes), strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fl = task.settings(context.run_config)
    server = task.new_server(cfg, task.initial_global_state(cfg))
    t0 = time.time()
    history: dict = {"rounds": {}}
    if fl.secagg:
        for r in range(1, cfg.rounds + 1):
            size = max(fl.min_train_nodes, int(len(list(grid.get_node_ids())) * fl.fraction_train))
            new, n = secure_round(grid, context, server.global_state, fl, r, size)
            if new is not None:
                server.global_state = new
            history["rounds"][r] = {"contributions": n}
        arrays = to_record(server.global_state)
    else:
        outer, inner = build_strategy(cfg, fl, server)
        result = outer.start(grid, to_record(server.global_state), num_rounds=cfg.rounds, timeout=fl.round_timeout)
        arrays = result.arrays if result.arrays is not None else to_record(server.global_state)
        for r in range(1, cfg.rounds + 1):
            history["rounds"][r] = {"train": metrics_of(result.train_metrics_clientapp.get(r)),
                                    "rejected": inner.rejected.get(r, {}), "ppl": inner.eval_ppl.get(r, {}),
                                    "train_seconds": inner.train_seconds.get(r)}
    history["seconds"] = time.time() - t0
    write_results(Path(cfg.out_dir.replace("{strategy}", cfg.strategy)), arrays, history, cfg, fl)
    deliver_final(grid, arrays, cfg.rounds, fl.round_timeout)


def write_results(out: Path, arrays: ArrayRecord, history: dict, cfg, fl) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in arrays.to_torch_state_dict().items()}, str(out / "global.safetensors"))
    (out / "history.json").write_text(json.dumps({"config": cfg.to_dict(), "federation": vars(fl), **history},
                                                 indent=1, default=str))
    log.info("CoMiGS over Flower: %d round(s) in %.1fs; results in %s", cfg.rounds, history["seconds"], out)

