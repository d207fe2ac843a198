"""The server averages shared tensors only, uniformly or by tokens, and rejects broken uploads."""

from __future__ import annotations

import logging

import torch

from pocketlm.collab import Server, Upload

G = "model.layers.0.mlp.experts.0.up_proj.lora_A"
A = "model.layers.0.self_attn.q_proj.attn_lora.lora_B"
S = "model.layers.0.mlp.experts.1.up_proj.lora_A"


def _server(aggregation="uniform"):
    s = Server({"generalist", "attn_lora"}, aggregation)
    s.init_from([{G: torch.zeros(2, 3), A: torch.zeros(4, 2), S: torch.zeros(2, 3)}])
    return s


def test_only_shared_roles_are_global():
    s = _server()
    assert set(s.global_state) == {G, A}


def test_uniform_and_token_weighted_means():
    ups = [Upload("a", {G: torch.full((2, 3), 1.0), A: torch.full((4, 2), 2.0)}, 100),
           Upload("b", {G: torch.full((2, 3), 3.0), A: torch.full((4, 2), 4.0)}, 300)]
    s = _server()
    s.aggregate(ups)
    assert torch.allclose(s.global_state[G], torch.full((2, 3), 2.0))
    s = _server("tokens")
    s.aggregate(ups)
    assert torch.allclose(s.global_state[G], torch.full((2, 3), 2.5))
    assert torch.allclose(s.global_state[A], torch.full((4, 2), 3.5))


def test_heterogeneous_users_average_by_name():
    """A generalist-only device uploads no attention tensor here: each tensor averages over its holders."""
    s = _server()
    s.aggregate([Upload("weak", {G: torch.full((2, 3), 1.0)}, 1),
                 Upload("strong", {G: torch.full((2, 3), 3.0), A: torch.full((4, 2), 5.0)}, 1)])
    assert torch.allclose(s.global_state[G], torch.full((2, 3), 2.0))
    assert torch.allclose(s.global_state[A], torch.full((4, 2), 5.0))


def test_broken_uploads_are_rejected_and_the_round_goes_on(caplog):
    s = _server()
    nan = torch.zeros(2, 3)
    nan[0, 0] = float("nan")
    ups = [Upload("good", {G: torch.ones(2, 3)}, 1),
           Upload("nan", {G: nan}, 1),
           Upload("inf", {A: torch.full((4, 2), float("inf"))}, 1),
           Upload("shape", {G: torch.ones(3, 2)}, 1),
           Upload("private", {S: torch.ones(2, 3)}, 1)]
    with caplog.at_level(logging.WARNING):
        report = s.aggregate(ups)
    assert report.accepted == ["good"]
    assert set(report.rejected) == {"nan", "inf", "shape", "private"}
    assert "non-finite" in report.rejected["nan"] and "shape" in report.rejected["shape"]
    assert "rejected the update of nan" in caplog.text
    assert torch.equal(s.global_state[G], torch.ones(2, 3))
    assert torch.equal(s.global_state[A], torch.zeros(4, 2))  # untouched: its only upload was rejected
