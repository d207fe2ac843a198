"""A real Flower deployment on loopback: one `flower-superlink` and three `flower-supernode` processes (insecure
mode), runs submitted with `flwr run . CONN --stream`. Two rounds equal the in-process simulation with
heterogeneous devices and no private tensor name leaves a node; a SuperNode killed mid-round does not stop the
run, and once restarted it resumes from its private state. Every process is started in its own process group
and stopped by the test (`LoopbackFederation`); every wait is bounded."""

from __future__ import annotations

import json
import os
import signal

import pytest

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from safetensors.torch import load_file  # noqa: E402

from conftest import REPO, write_folder_corpus  # noqa: E402
from flower_local import TRAIN, USERS, assert_matches_simulation, run_config, simulate  # noqa: E402
from pocketlm.collab.flower.loopback import LoopbackFederation, wait_for  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402

RUN_TIMEOUT = 300      # one `flwr run`, seconds (2 cores shared with other work)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    with LoopbackFederation(root, REPO) as f:
        f.corpus = write_folder_corpus(root / "corpus")
        f.start_superlink()
        for i in range(3):
            start_node(f, i)
        yield f


def start_node(fed, i: int) -> None:
    fed.start_node(f"node{i}", {"partition-id": i, "state-dir": str(fed.root / "state" / USERS[i]),
                                "audit-log": str(fed.root / f"audit{i}.jsonl")})


def rc_for(fed, name: str, **extra) -> dict:
    return run_config(fed.corpus, fed.root / name, experts="3,2,1", **extra)


def test_deployment_equals_the_simulation_and_sends_nothing_private(fed, tmp_path):
    fed.run(rc_for(fed, "a"), "a", RUN_TIMEOUT, expect=fed.root / "a" / "out" / "1g1s" / "history.json")
    sim = simulate(fed.corpus, tmp_path, experts=[3, 2, 1])
    glob = load_file(str(fed.root / "a" / "out" / "1g1s" / "global.safetensors"))
    assert_matches_simulation(sim, glob, {u: fed.root / "state" / u for u in USERS})
    for i in range(3):   # the audit mod wraps everything else: this is what left each device
        sent = [json.loads(line) for line in (fed.root / f"audit{i}.jsonl").read_text().splitlines()]
        assert [s["type"] for s in sent] == ["train"] * TRAIN["rounds"] + ["query.global"]
        names = [n for s in sent for rec in s["arrays"].values() for n in rec]
        assert names and {param_role(n) for n in names} <= {"generalist", "attn_lora"}
        assert not any("router" in k or ".experts.1" in k for s in sent for rec in s["configs"].values()
                       for k in rec)


def test_a_supernode_killed_mid_round_does_not_stop_the_run_and_resumes_when_restarted(fed):
    meta = fed.root / "state" / "carol" / "device.json"
    before = json.loads(meta.read_text())
    received = fed.log("node2").count("Receiving: train message")
    # 3 rounds; every round waits for 3 connected nodes but aggregates what arrives (>= 2)
    runner = fed.submit(rc_for(fed, "b", rounds=3, **{"min-available-nodes": 3, "min-train-nodes": 2,
                                                      "round-timeout": 90.0}), "b")
    try:
        # carol's SuperNode is killed once it has taken round 2's message (mid-round), then restarted
        wait_for(lambda: fed.log("node2").count("Receiving: train message") >= received + 2, RUN_TIMEOUT,
                 "carol to receive round 2")
        fed.stop("node2")
        killed = json.loads(meta.read_text())
        start_node(fed, 2)
        fed.finish(runner, "b", RUN_TIMEOUT, expect=fed.root / "b" / "out" / "1g1s" / "history.json")
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.communicate(timeout=10)
    hist = json.loads((fed.root / "b" / "out" / "1g1s" / "history.json").read_text())
    accepted = [hist["rounds"][str(r)]["train"]["accepted"] for r in (1, 2, 3)]
    assert accepted == [3, 2, 3], accepted                 # round 2 went on without carol; she is back in 3
    after = json.loads(meta.read_text())
    # carol resumed from her private state: round 1 of this run before the kill, round 3 after it
    assert killed["rounds_done"] == before["rounds_done"] + 1
    assert after["rounds_done"] == before["rounds_done"] + 2
    assert after["step"] == before["step"] + 2 * TRAIN["local_steps"]
