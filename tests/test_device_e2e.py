"""The README's device section, run as written on loopback (tiny model): a SuperLink and two SuperNodes with
`--user NOTES --state DIR` train 2 rounds (`pocketlm fl run`); one node is killed (SIGTERM) in round 2. Then
`pocketlm device status` and `pocketlm device steer` through a step server give exactly the tokens of
in-process personal steering with the same tensors, for the device that finished (its shared parts: the final
average of round 2) and for the killed one (its last complete state). The privacy audit holds along the way: no
private tensor name left a node, and the uplink to the cloud holds token ids only, none of the profile's names
(the default leak guard ran)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess

import pytest

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from typer.testing import CliRunner  # noqa: E402

from conftest import REPO  # noqa: E402
from flower_local import TRAIN  # noqa: E402
from pocketlm.cli import app  # noqa: E402
from pocketlm.collab.flower.loopback import BIN, LoopbackFederation, free_port, wait_for  # noqa: E402
from pocketlm.collab.flower.state import describe  # noqa: E402
from pocketlm.models import build_tiny, load_model  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402
from pocketlm.moe.personal import load_personal  # noqa: E402
from pocketlm.steer import SteerEngine, SteerRequest, get_method  # noqa: E402
from pocketlm.steer.cloud.in_process import HFCloudBackend  # noqa: E402
from pocketlm.steer.fusion.leak_guard import parse_front_matter, private_by_default  # noqa: E402
from pocketlm.steer.fusion.leakage import longest_copy, words  # noqa: E402
from serve_fixtures import IGNORE_UVICORN_WARNINGS, TOKEN, lively, start_server  # noqa: E402
from test_serve_privacy import RecordingProxy, client_frames  # noqa: E402

pytestmark = pytest.mark.filterwarnings(IGNORE_UVICORN_WARNINGS)
PROFILE = "---\nprotect: sailing\n---\nI am Giulia, a retired sailor from Genoa. I love the sea and sailing.\n"
NAMES = {"giulia", "genoa", "sailing"}
RUN_TIMEOUT = 240
NOTES = {"alice": "the cat sat on the mat and purred quietly {}", "bob": "ERROR 404: page {} was not found"}


def readme_commands() -> list[list[str]]:
    """The README's device-section commands, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("One device, from a folder of notes", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()]


def _sub(argv: list[str], subs: dict[str, str]) -> list[str]:
    out = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The README's training commands on loopback; bob's SuperNode is stopped once round 2 reached it."""
    root = tmp_path_factory.mktemp("device")
    cmds = {" ".join(c[1:3]): c for c in readme_commands()}
    assert set(cmds) == {"fl superlink", "fl supernode", "fl run", "device status", "device steer"}
    with LoopbackFederation(root, REPO) as fed:
        port = fed.port
        subs = {"9091": str(port), "server:": "127.0.0.1:", "prod": "loop"}
        fed._start("superlink", [str(BIN / "pocketlm"), *_sub(cmds["fl superlink"], subs)[1:]])
        wait_for(lambda: "Uvicorn running" in fed.log("superlink"), 60, "the SuperLink")
        for user, pattern in NOTES.items():
            notes = root / "notes" / user
            notes.mkdir(parents=True)
            for i in range(6):
                (notes / f"n{i}.txt").write_text("\n".join(pattern.format(i * 10 + j) for j in range(10)))
            node = _sub(cmds["fl supernode"], {**subs, "~/my-notes": str(notes), "~/pocketlm-device":
                                               str(root / "state" / user)})
            fed._start(user, [str(BIN / "pocketlm"), *node[1:], "--port", str(free_port()),
                              "--audit-log", str(root / f"audit-{user}.jsonl")])
            wait_for(lambda u=user: "SuperNode ID" in fed.log(u), 60, f"SuperNode {user}")
        overrides = {**TRAIN, "max_chars": "none", "out_dir": str(root / "out"), "round-timeout": 60,
                     "fraction-evaluate": 0.0}
        run = [str(BIN / "pocketlm"), *cmds["fl run"][1:]]
        run = _sub(run, subs) + [x for k, v in overrides.items() for x in ("--set", f"{k}={v}")]
        runner = subprocess.Popen(run, cwd=REPO, env=fed.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        # bob is stopped once round 2's train message reached it: the run goes on with alice
        wait_for(lambda: fed.log("bob").count("Receiving: train message") >= 2 or runner.poll() is not None,
                 RUN_TIMEOUT, "round 2 at bob")
        if runner.poll() is None:
            fed.stop("bob")
        fed.finish(runner, "run", RUN_TIMEOUT, expect=root / "out" / "history.json")
        yield {"root": root, "cmds": cmds, "env": fed.env}


def _uplink_text(stream: bytes, tok) -> tuple[str, list[int]]:
    _, frames = client_frames(stream)
    msgs = [json.loads(p) for op, p in frames if op == 0x1]
    steps = [i for m in msgs if m["op"] == "step" for i in m["ids"]]
    return tok.decode(steps, skip_special_tokens=True), steps


def _reference(cloud, tok, state, prompt: str) -> list[int]:
    """In-process personal steering with the same tensors and the default guard."""
    device = load_personal(load_model("tiny-llama", seed=1)[0], state)   # the CLI's device seed (load_engine)
    ctx, protect = parse_front_matter(PROFILE)
    m = get_method("closed_form").with_guards(*private_by_default(None, protect))
    eng = SteerEngine(HFCloudBackend(cloud, tok), tok, device, tok)
    return eng.generate([SteerRequest.with_context(prompt, ctx)], [m], max_new_tokens=12)[0].token_ids


def test_readme_device_path_trains_keeps_the_final_average_and_leaks_nothing(world):
    root = world["root"]
    alice, bob = describe(root / "state" / "alice"), describe(root / "state" / "bob")
    assert alice["rounds_done"] == 2 and alice["shared_from_round"] == 2
    assert bob["rounds_done"] in (1, 2) and bob["shared_from_round"] is None     # killed: its own last state
    for user in NOTES:
        sent = [json.loads(line) for line in (root / f"audit-{user}.jsonl").read_text().splitlines()]
        names = [n for s in sent for rec in s["arrays"].values() for n in rec]
        assert names and {param_role(n) for n in names} <= {"generalist", "attn_lora"}
        assert not any("router" in k or ".experts.1" in k for s in sent for rec in s["configs"].values() for k in rec)
    status = _sub(world["cmds"]["device status"], {"~/pocketlm-device": str(root / "state" / "alice")})
    out = subprocess.run([str(BIN / "pocketlm"), *status[1:]], env=world["env"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "global average of round 2" in out.stdout and "alice" in out.stdout


def test_device_steer_through_a_step_server_equals_in_process_personal_steering(world, tmp_path):
    root = world["root"]
    cloud, tok = build_tiny("tiny-llama", seed=11)
    lively(cloud, 1)
    server = start_server(cloud, tok)
    proxy = RecordingProxy(server.port)
    try:
        profile = tmp_path / "profile.txt"
        profile.write_text(PROFILE)
        steer = _sub(world["cmds"]["device steer"], {"~/pocketlm-device": str(root / "state" / "alice"),
                                                     "~/profile.txt": str(profile),
                                                     "http://cloud-host:8400": proxy.url})
        prompt = steer[3]
        env = {**world["env"], "POCKETLM_CLOUD_TOKEN": TOKEN}
        out = subprocess.run([str(BIN / "pocketlm"), *steer[1:], "--max-new-tokens", "12", "--json",
                              str(tmp_path / "alice.json")], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        doc = json.loads((tmp_path / "alice.json").read_text())
        assert doc["guards"] == ["max_copy_8", "protect_names"] and doc["device"]["shared_from_round"] == 2
        assert doc["token_ids"] == _reference(cloud, tok, root / "state" / "alice", prompt)
        # the killed device steers from its last complete state (in process CLI, same server)
        os.environ["POCKETLM_CLOUD_TOKEN"] = TOKEN
        try:
            res = CliRunner().invoke(app, ["device", "steer", prompt, "--state", str(root / "state" / "bob"),
                                           "--profile", str(profile), "--cloud", proxy.url, "--max-new-tokens", "12",
                                           "--json", str(tmp_path / "bob.json")])
        finally:
            os.environ.pop("POCKETLM_CLOUD_TOKEN", None)
        assert res.exit_code == 0, res.output
        assert json.loads((tmp_path / "bob.json").read_text())["token_ids"] == \
            _reference(cloud, tok, root / "state" / "bob", prompt)
        # the uplink: operations and token ids only; neither the profile nor any of its names went up
        ctx, _ = parse_front_matter(PROFILE)
        for stream in proxy.up:
            assert ctx.encode() not in bytes(stream) and b"Giulia" not in bytes(stream)
            text, steps = _uplink_text(bytes(stream), tok)
            assert steps and not NAMES & set(words(text)) and longest_copy(text, ctx, prompt) <= 8
    finally:
        proxy.close()
        server.stop()
