"""The CoMiGS FedAvg and the privacy add-ons: per-tensor averaging over heterogeneous key sets (uniform or by
tokens), bad uploads rejected with a log line while the round goes on, Flower's DP wrappers and mod clip, and
SecAgg+ gives the plain average within its quantisation step."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flower_local import LocalGrid, as_server_process, run_config  # noqa: E402
from pocketlm.collab.flower import client_app, server_app  # noqa: E402
from pocketlm.collab.flower.strategy import ARRAYS, INFO, METRICS, CoMiGSFedAvg  # noqa: E402
from pocketlm.collab.server import Server  # noqa: E402

G0 = "model.layers.0.mlp.experts.0.up_proj.lora_A"        # generalist names (shared under 1g1s)
G1 = "model.layers.1.mlp.experts.0.up_proj.lora_A"


def server(aggregation="uniform") -> Server:
    s = Server({"generalist", "attn_lora"}, aggregation)
    s.global_state = {G0: torch.zeros(2), G1: torch.zeros(3)}
    return s


def reply(node: int, user: str, arrays: dict, tokens: int = 1) -> Message:
    as_server_process()
    ins = Message(RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    return Message(RecordDict({ARRAYS: ArrayRecord({k: torch.as_tensor(v, dtype=torch.float32) for k, v in arrays.items()}),
                               METRICS: MetricRecord({"num-examples": tokens, "train-tokens": tokens}),
                               INFO: ConfigRecord({"user": user})}), reply_to=ins)


def test_heterogeneous_key_sets_are_averaged_per_tensor_uniform_or_by_tokens():
    replies = [reply(1, "big", {G0: [1.0, 1.0], G1: [1.0, 1.0, 1.0]}, tokens=1), reply(2, "small", {G0: [3.0, 3.0]}, 3)]
    arrays, metrics = CoMiGSFedAvg(server("uniform")).aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    assert got[G0].tolist() == [2.0, 2.0] and got[G1].tolist() == [1.0, 1.0, 1.0]   # G1: only "big" holds it
    assert metrics["accepted"] == 2
    arrays, _ = CoMiGSFedAvg(server("tokens")).aggregate_train(1, replies)
    assert arrays.to_torch_state_dict()[G0].tolist() == [2.5, 2.5]                  # (1*1 + 3*3) / 4


def test_bad_uploads_are_rejected_with_a_log_line_and_the_round_goes_on(caplog):
    strategy = CoMiGSFedAvg(server(), max_update_norm=10.0)
    replies = [reply(1, "good", {G0: [1.0, 1.0]}), reply(2, "nan", {G0: [float("nan"), 0.0]}),
               reply(3, "shape", {G0: [1.0, 1.0, 1.0]}), reply(4, "huge", {G0: [100.0, 0.0]}),
               reply(5, "stranger", {"model.layers.0.mlp.router.weight": [1.0]})]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays.to_torch_state_dict()[G0].tolist() == [1.0, 1.0]
    assert metrics["accepted"] == 1 and metrics["rejected"] == 4
    why = strategy.rejected[1]
    assert "non-finite" in why["nan"] and "shape" in why["shape"] and "max-update-norm" in why["huge"]
    assert "non-shared" in why["stranger"]
    logged = caplog.text
    assert all(f"rejected the update of {u}" in logged for u in ("nan", "shape", "huge", "stranger"))


def test_server_side_dp_clips_every_update_to_the_clipping_norm():
    inner = CoMiGSFedAvg(server())
    dp = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=0.0, clipping_norm=0.5,
                                                   num_sampled_clients=2)
    start = ArrayRecord({G0: torch.zeros(2), G1: torch.zeros(3)})
    assert len(list(dp.configure_train(1, start, ConfigRecord(), LocalGrid(None, {1: {}, 2: {}}, {})))) == 2
    replies = [reply(1, "a", {G0: [3.0, 4.0], G1: [0.0, 0.0, 0.0]}), reply(2, "b", {G0: [0.0, 0.0], G1: [0.0, 0.0, 0.3]})]
    arrays, _ = dp.aggregate_train(1, replies)
    got = arrays.to_torch_state_dict()
    # a's update (norm 5) is scaled to norm 0.5, b's (norm 0.3) is kept; then the plain mean
    torch.testing.assert_close(got[G0], torch.tensor([0.15, 0.2]))
    torch.testing.assert_close(got[G1], torch.tensor([0.0, 0.0, 0.15]))


def _node_context(folder_corpus, tmp_path, **extra) -> Context:
    rc = run_config(folder_corpus, tmp_path, **extra)
    return Context(1, 1, {"partition-id": 0}, RecordDict(), rc)


def test_client_side_dp_mod_clips_what_the_device_sends(folder_corpus, tmp_path):
    from pocketlm.collab.flower import task

    ctx = _node_context(folder_corpus, tmp_path, dp="client", **{"dp-clipping-norm": 1e-3})
    glob = task.initial_global_state(task.settings(ctx.run_config)[0])
    as_server_process()
    msg = Message(RecordDict({ARRAYS: ArrayRecord(glob), "config": ConfigRecord({"clipping_norm": 1e-3})}),
                  dst_node_id=1, message_type=MessageType.TRAIN)
    msg.metadata.__dict__["_message_id"] = "m1"
    out = client_app.app(msg, ctx)
    sent = out.content.array_records[ARRAYS].to_torch_state_dict()
    norm = sum(float(((sent[n] - glob[n]) ** 2).sum()) for n in glob) ** 0.5
    assert 0 < norm <= 1e-3 * (1 + 1e-4)


def test_secagg_plus_gives_the_plain_average_within_its_quantisation_step(folder_corpus, tmp_path):
    def run(tag, **extra):
        rc = run_config(folder_corpus, tmp_path / tag, rounds=1, **extra)
        grid = LocalGrid(client_app.app, {i + 1: {"partition-id": i} for i in range(3)}, rc)
        server_app.app(grid, Context(1, 0, {}, RecordDict(), rc))
        return load_file(str(tmp_path / tag / "out" / "1g1s" / "global.safetensors")), grid

    plain, _ = run("plain")
    secure, grid = run("secure", secagg=True)
    step = 2 * 8.0 / 2**22                     # clipping range [-8, 8] in 2**22 levels
    assert set(plain) == set(secure)
    for n in plain:
        torch.testing.assert_close(secure[n], plain[n], atol=2 * step, rtol=0, msg=n)
    assert any(not torch.equal(secure[n], plain[n]) for n in plain)       # it really went through SecAgg+
    assert grid.contexts[1].state.config_records      # the SecAgg+ mod kept its protocol state on the node
