"""The Flower ServerApp and ClientApp in one process (an in-process Grid, no network): CoMiGS over Flower gives
the in-process simulation's result with heterogeneous devices, nothing private is ever sent, a new run resumes
every device from its private state, and bad run configs fail clearly."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from flwr.app import Context, RecordDict  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from flower_local import (  # noqa: E402
    TRAIN,
    USERS,
    LocalGrid,
    assert_matches_simulation,
    node_params,
    run_config,
    simulate,
)
from pocketlm.collab.flower import client_app, server_app  # noqa: E402
from pocketlm.collab.flower.task import ConfigError, settings  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402


def run_flower(rc: dict, nodes: int = 3, sent=None) -> LocalGrid:
    grid = LocalGrid(client_app.app, {i + 1: {"partition-id": i} for i in range(nodes)}, rc, sent=sent)
    server_app.app(grid, Context(1, 0, {}, RecordDict(), rc))
    return grid


def test_flower_rounds_equal_the_simulation_send_nothing_private_and_a_new_run_resumes(folder_corpus, tmp_path):
    sim = simulate(folder_corpus, tmp_path, experts=[3, 2, 1])
    sent = []
    run_flower(run_config(folder_corpus, tmp_path, experts="3,2,1"), sent=sent)
    glob = load_file(str(tmp_path / "out" / "1g1s" / "global.safetensors"))
    assert_matches_simulation(sim, glob, {u: tmp_path / "state" / u for u in USERS})
    # nothing private ever left a node: not as an array, not as a key anywhere in a reply
    assert len(sent) == 3 * (TRAIN["rounds"] + 1)       # the train replies, then each node keeping the final average
    for reply in sent:
        for rec in reply.content.array_records.values():
            assert {param_role(n) for n in rec} <= {"generalist", "attn_lora"}
        text = repr([dict(r) for r in reply.content.config_records.values()]) + \
            repr([dict(r) for r in reply.content.metric_records.values()])
        assert "router" not in text and ".experts.1" not in text
    # a new run: every device continues from its private state (its counters go on), it does not start over
    first = node_params(tmp_path / "state" / "alice")
    run_flower(run_config(folder_corpus, tmp_path, experts="3,2,1", rounds=1))
    meta = json.loads((tmp_path / "state" / "alice" / "device.json").read_text())
    assert meta["step"] == 3 * TRAIN["local_steps"] and meta["rounds_done"] == 3
    second = node_params(tmp_path / "state" / "alice")
    assert any(not torch.equal(first[n], second[n]) for n in first if param_role(n) == "specialist")


def test_unknown_or_bad_run_config_is_a_clear_error(folder_corpus, tmp_path):
    with pytest.raises(ConfigError, match="unknown run-config key 'nonsense'"):
        settings({**run_config(folder_corpus, tmp_path), "nonsense": 1})
    with pytest.raises(ConfigError, match="dp must be"):
        settings({**run_config(folder_corpus, tmp_path), "dp": "maybe"})
    with pytest.raises(ConfigError, match="partition-id 7 out of range"):
        client_app.task.node_setup(run_config(folder_corpus, tmp_path), {"partition-id": 7})


def test_the_flower_app_declares_every_training_key():
    """`flwr run --run-config` only overrides declared keys, and `pocketlm fl run` sends them all."""
    import dataclasses
    import tomllib

    from conftest import REPO
    from pocketlm.collab.config import TrainConfig

    app = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"]["clientapp"] == "pocketlm.collab.flower.client_app:app"
    declared = set(app["config"])
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= declared
    cfg, fl = settings(app["config"])          # the defaults are valid as they stand
    assert cfg.model == "tiny-llama" and fl.dp == "off"


def test_fl_wrappers_print_the_exact_flower_commands(tmp_path):
    from typer.testing import CliRunner

    from pocketlm.cli import app

    r = CliRunner().invoke(app, ["fl", "supernode", "--state", str(tmp_path / "s"), "--user", str(tmp_path / "u"),
                                 "--superlink", "10.0.0.1:9091", "--experts", "3", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "flower-supernode --superlink 10.0.0.1:9091" in r.output and "experts=3" in r.output
    assert f'user-dir="{tmp_path / "u"}"' in r.output and "--insecure" in r.output
    from pocketlm.collab.flower.certs import make_tls

    certs = make_tls(tmp_path / "certs", ["server"])
    r = CliRunner().invoke(app, ["fl", "superlink", "--tls", str(tmp_path / "certs"), "--auth", "--dry-run"])
    assert f"--ssl-certfile {certs['server.pem']}" in r.output and "--enable-supernode-auth" in r.output
    assert "--insecure" not in r.output
    r = CliRunner().invoke(app, ["fl", "supernode", "--state", "s", "--dry-run"])
    assert r.exit_code != 0
