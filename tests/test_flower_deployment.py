"""A real Flower deployment on loopback: one `flower-superlink` and three `flower-supernode` processes (insecure
mode), runs submitted with `flwr run . CONN --stream`. Two rounds equal the in-process simulation with
heterogeneous devices and no private tensor name leaves a node; a SuperNode killed mid-run does not stop the
run, and once restarted it resumes from its private state. Every process is started in its own process group
and stopped by the test; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from safetensors.torch import load_file  # noqa: E402

from conftest import REPO, write_folder_corpus  # noqa: E402
from flower_local import TRAIN, USERS, assert_matches_simulation, run_config, simulate  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402

BIN = Path(sys.executable).parent
RUN_TIMEOUT = 240      # one `flwr run`, seconds (2 cores shared with other work)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Federation:
    """SuperLink + SuperNodes on 127.0.0.1; each process in its own group, all stopped by `stop()`."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr-home"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        home = root / "flwr-home"
        home.mkdir(parents=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')

    def _start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                             start_new_session=True)
        log.close()
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_superlink(self) -> None:
        # no runtime dependency installation: the apps run in this environment (else uv builds a new one per run)
        self._start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.port), "--disable-runtime-dependency-installation"])
        wait_for(lambda: "Uvicorn running" in self.log("superlink"), 60, "the SuperLink")

    def start_node(self, i: int, **node_config) -> None:
        name = f"node{i}"
        before = self.log(name).count("SuperNode ID") if (self.root / f"{name}.log").exists() else 0
        cfg = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in
                       {"partition-id": i, "state-dir": str(self.root / "state" / USERS[i]),
                        "audit-log": str(self.root / f"audit{i}.jsonl"), **node_config}.items())
        self._start(name, [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                           "--port", str(free_port()), "--node-config", cfg])
        wait_for(lambda: self.log(name).count("SuperNode ID") > before, 60, f"SuperNode {i} to register")

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def run(self, rc: dict, name: str) -> subprocess.CompletedProcess:
        """`flwr run <checkout> loop --run-config FILE --stream`, bounded by RUN_TIMEOUT."""
        cfg = self.root / f"{name}.toml"
        cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in rc.items()))
        p = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "loop", "--run-config", str(cfg), "--stream"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                             start_new_session=True, text=True)
        try:
            out, _ = p.communicate(timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate(timeout=10)
            raise AssertionError(f"flwr run {name} timed out:\n{out[-3000:]}") from None
        (self.root / f"{name}.out").write_text(out)
        return subprocess.CompletedProcess(p.args, p.returncode, out)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed")
    f = Federation(root)
    f.corpus = write_folder_corpus(root / "corpus")
    try:
        f.start_superlink()
        for i in range(3):
            f.start_node(i)
        yield f
    finally:
        f.stop_all()


def rc_for(fed, name: str, **extra) -> dict:
    rc = run_config(fed.corpus, fed.root / name, experts="3,2,1", **extra)
    rc["state-root"] = str(fed.root / "state")
    return rc


def test_deployment_equals_the_simulation_and_sends_nothing_private(fed, tmp_path):
    res = fed.run(rc_for(fed, "a"), "a")
    assert res.returncode == 0, res.stdout[-3000:]
    sim = simulate(fed.corpus, tmp_path, experts=[3, 2, 1])
    glob = load_file(str(fed.root / "a" / "out" / "1g1s" / "global.safetensors"))
    assert_matches_simulation(sim, glob, {u: fed.root / "state" / u for u in USERS})
    for i in range(3):   # the audit mod wraps everything else: this is what left each device
        sent = [json.loads(line) for line in (fed.root / f"audit{i}.jsonl").read_text().splitlines()]
        assert len(sent) == TRAIN["rounds"]
        names = [n for s in sent for rec in s["arrays"].values() for n in rec]
        assert names and {param_role(n) for n in names} <= {"generalist", "attn_lora"}
        assert not any("router" in k or ".experts.1" in k for s in sent for rec in s["configs"].values()
                       for k in rec)


def test_a_supernode_killed_mid_round_does_not_stop_the_run_and_resumes_when_restarted(fed):
    meta = fed.root / "state" / "carol" / "device.json"
    before = json.loads(meta.read_text())
    received = fed.log("node2").count("Receiving: train message")
    # 3 rounds; every round waits for 3 connected nodes but aggregates what arrives (>= 2)
    rc = rc_for(fed, "b", rounds=3, **{"min-available-nodes": 3, "min-train-nodes": 2, "round-timeout": 90.0})
    cfg = fed.root / "b.toml"
    cfg.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in rc.items()))
    runner = subprocess.Popen([str(BIN / "flwr"), "run", str(REPO), "loop", "--run-config", str(cfg), "--stream"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=fed.env, cwd=fed.root,
                              start_new_session=True, text=True)
    try:
        # carol's SuperNode is killed once it has taken round 2's message (mid-round), then restarted
        wait_for(lambda: fed.log("node2").count("Receiving: train message") >= received + 2, RUN_TIMEOUT,
                 "carol to receive round 2")
        fed.stop("node2")
        killed = json.loads(meta.read_text())
        fed.start_node(2)
        out, _ = runner.communicate(timeout=RUN_TIMEOUT)
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.communicate(timeout=10)
    assert runner.returncode == 0, out[-3000:]
    hist = json.loads((fed.root / "b" / "out" / "1g1s" / "history.json").read_text())
    accepted = [hist["rounds"][str(r)]["train"]["accepted"] for r in (1, 2, 3)]
    assert accepted == [3, 2, 3], accepted                 # round 2 went on without carol; she is back in 3
    after = json.loads(meta.read_text())
    # carol resumed from her private state: round 1 of this run before the kill, round 3 after it
    assert killed["rounds_done"] == before["rounds_done"] + 1
    assert after["rounds_done"] == before["rounds_done"] + 2
    assert after["step"] == before["step"] + 2 * TRAIN["local_steps"]
