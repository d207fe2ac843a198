"""Secure aggregation of the shared tensors with Flower's SecAgg+ (server: `SecAggPlusWorkflow`; nodes:
`secaggplus_mod`, switched on by `client_app.privacy_mod`).

Flower ships SecAgg+ only for its legacy strategy interface, so one round is a `SecAggPlusWorkflow` driven with a
`LegacyContext` whose small strategy hands out the global arrays (names travel in the config, arrays in order)
and receives the unmasked weighted average. The server never sees one device's update, only the sum; so it
cannot check single uploads either (each device skips its own non-finite steps). Every device must hold the same
shared tensors (true for 1g1s with any expert counts).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ConfigRecord, Context
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes

log = logging.getLogger(__name__)


class _OneRound(LegacyStrategy):
    """Sends the global arrays to the sampled nodes; keeps the securely aggregated result."""

    def __init__(self, grid: Grid, run_id: int, node_ids: list[int], names: list[str], server_round: int):
        self.grid, self.run_id, self.node_ids, self.names, self.round = grid, run_id, node_ids, names, server_round
        self.result: list[np.ndarray] | None = None
        self.replies = 0

    def configure_fit(self, server_round, parameters, client_manager):
        config = {"names": "\n".join(self.names), "server-round": self.round}   # legacy configs hold scalars only
        return [(GridClientProxy(n, self.grid, self.run_id), FitIns(parameters, dict(config))) for n in self.node_ids]

    def aggregate_fit(self, server_round, results, failures):
        self.replies = len(results)
        if results:
            self.result = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def _shares(x: float) -> int | float:
    return int(x) if x > 1 else float(x)


def secure_round(grid: Grid, context: Context, global_state: dict[str, torch.Tensor], fl, server_round: int,
                 sample_size: int) -> tuple[dict[str, torch.Tensor] | None, int]:
    """One SecAgg+ round; returns (the new global state or None when it failed, number of contributions)."""
    names = list(global_state)
    node_ids, _ = sample_nodes(grid, fl.min_available_nodes, sample_size)
    strategy = _OneRound(grid, context.run_id, node_ids, names, server_round)
    lctx = LegacyContext(context, config=ServerConfig(num_rounds=1), strategy=strategy)
    lctx.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    params = ndarrays_to_parameters([global_state[n].float().numpy() for n in names])
    lctx.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(params, keep_input=True)
    workflow = SecAggPlusWorkflow(_shares(fl.secagg_num_shares), _shares(fl.secagg_threshold),
                                  max_weight=fl.secagg_max_weight, clipping_range=fl.secagg_clipping_range,
                                  quantization_range=int(fl.secagg_quantization_range), timeout=fl.round_timeout)
    workflow(grid, lctx)
    if strategy.result is None:
        log.warning("round %d: secure aggregation produced no result; the global state is unchanged", server_round)
        return None, 0
    new = {n: torch.from_numpy(np.asarray(a, dtype=np.float32).reshape(global_state[n].shape).copy())
           for n, a in zip(names, strategy.result, strict=True)}
    if not all(torch.isfinite(t).all() for t in new.values()):
        log.warning("round %d: the secure aggregate is not finite; the global state is unchanged", server_round)
        return None, strategy.replies
    return new, strategy.replies

