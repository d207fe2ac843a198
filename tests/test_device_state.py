"""One device state, two uses: what a Flower device trains (its private state directory) is the personal model it
steers with. In process (an in-process Grid, no network): after the last round every node keeps the server's final
average beside its own state; `load_personal` / `--adapters` read the directory as the latest global shared parts
plus the device's private experts and router; a crash at any point of a save leaves the last complete state; a
state of another base or a half-written one is an error naming the file."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional `flower` extra")

from flwr.app import Context, RecordDict  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from flower_local import USERS, LocalGrid, node_params, run_config  # noqa: E402
from pocketlm.collab.flower import client_app, server_app  # noqa: E402
from pocketlm.collab.flower.state import PrivateStateError, describe, read_device  # noqa: E402
from pocketlm.errors import PocketLMError  # noqa: E402
from pocketlm.models import load_model  # noqa: E402
from pocketlm.moe import param_role  # noqa: E402
from pocketlm.moe.personal import load_personal  # noqa: E402


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """Two devices (alice, bob) trained 2 rounds through the real ServerApp / ClientApp code."""
    from conftest import write_folder_corpus

    root = tmp_path_factory.mktemp("devfed")
    corpus = write_folder_corpus(root / "corpus")
    rc = run_config(corpus, root, **{"min-available-nodes": 2, "min-train-nodes": 2})
    sent = []
    grid = LocalGrid(client_app.app, {i + 1: {"partition-id": i} for i in range(2)}, rc, sent=sent)
    server_app.app(grid, Context(1, 0, {}, RecordDict(), rc))
    return root, sent


def test_every_device_keeps_the_final_average_and_sends_nothing_private(fed):
    root, sent = fed
    glob = load_file(str(root / "out" / "1g1s" / "global.safetensors"))
    for user in USERS[:2]:
        d = root / "state" / user
        meta = json.loads((d / "device.json").read_text())
        assert meta["global"]["round"] == 2 and meta["global"]["step"] == meta["step"]
        kept = load_file(str(d / meta["global"]["tensors"]))
        assert kept and set(kept) <= set(glob)
        for n, t in kept.items():
            assert torch.equal(t, glob[n].float()) and param_role(n) in ("generalist", "attn_lora")
        info = describe(d)
        assert info["shared_from_round"] == 2 and info["rounds_done"] == 2 and info["bytes"] > 0
        assert info["tensors"]["private"] > 0 and (d / "adapter_config.json").is_file()
    finals = [r for r in sent if r.metadata.message_type.startswith("query")]
    assert len(finals) == 2
    for reply in sent:       # train replies and the final confirmations: nothing private
        for rec in reply.content.array_records.values():
            assert {param_role(n) for n in rec} <= {"generalist", "attn_lora"}
        text = repr([dict(r) for r in reply.content.config_records.values()])
        assert "router" not in text and ".experts.1" not in text


def test_the_state_directory_is_the_personal_model(fed):
    root, _ = fed
    d = root / "state" / "alice"
    base, _ = load_model("tiny-llama", seed=0)
    model = load_personal(base, d)
    own = node_params(d)
    glob = load_file(str(root / "out" / "1g1s" / "global.safetensors"))
    params = dict(model.named_parameters())
    assert set(own) == {n for n in params if param_role(n) is not None}
    for n, p in params.items():
        role = param_role(n)
        if role is None:
            continue
        want = glob[n] if role in ("generalist", "attn_lora") else own[n]   # latest global shared + own private
        torch.testing.assert_close(p.detach().float(), want.float(), msg=n)
    shared = {n for n in read_device(d).shared_names}
    assert shared and all(param_role(n) in ("generalist", "attn_lora") for n in shared)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if param_role(n) is not None}


def test_a_crash_anywhere_in_a_save_leaves_the_last_complete_state(fed, tmp_path):
    root, _ = fed
    src = root / "state" / "bob"
    base, _ = load_model("tiny-llama", seed=0)
    before = _params(load_personal(base, src))
    meta = json.loads((src / "device.json").read_text())
    # killed while writing the next tensor file, after writing it but before device.json, or mid global file
    crashes = {"partial": lambda d: (d / "device-99999999.safetensors.partial").write_bytes(b"\0" * 100),
               "unnamed": lambda d: shutil.copy(d / meta["tensors"], d / "device-99999999.safetensors"),
               "global": lambda d: (d / "global-99999999.safetensors.partial").write_bytes(b"xx")}
    for name, crash in crashes.items():
        d = tmp_path / name
        shutil.copytree(src, d)
        crash(d)
        after = _params(load_personal(base, d))
        assert all(torch.equal(before[n], after[n]) for n in before), name
    # a device that trained again after the final average steers with its own newer shared parts
    d = tmp_path / "stale"
    shutil.copytree(src, d)
    m = json.loads((d / "device.json").read_text())
    m["global"]["step"] -= 1
    (d / "device.json").write_text(json.dumps(m))
    assert read_device(d).global_round is None and describe(d)["shared_from_round"] is None


def test_half_written_or_foreign_states_are_errors_naming_the_file(fed, tmp_path):
    root, _ = fed
    base, _ = load_model("tiny-llama", seed=0)
    d = tmp_path / "missing"
    shutil.copytree(root / "state" / "alice", d)
    meta = json.loads((d / "device.json").read_text())
    (d / meta["tensors"]).unlink()
    with pytest.raises(PrivateStateError, match=meta["tensors"]):
        load_personal(base, d)
    d = tmp_path / "corrupt-global"
    shutil.copytree(root / "state" / "alice", d)
    (d / meta["global"]["tensors"]).write_bytes(b"not a tensor file")
    with pytest.raises(PrivateStateError, match=meta["global"]["tensors"]):
        load_personal(base, d)
    d = tmp_path / "first-save"
    d.mkdir()
    save_file({"params.x": torch.zeros(1)}, str(d / "device-00000002.safetensors"))
    with pytest.raises(PrivateStateError, match="device-00000002.safetensors has no device.json"):
        load_personal(base, d)
    other, _ = load_model("tiny-qwen2", seed=0)
    with pytest.raises(PocketLMError, match="adapter_config.json: adapters were trained on another base"):
        load_personal(other, root / "state" / "alice")
    with pytest.raises(PocketLMError, match="not a user's adapter folder or a device state"):
        load_personal(base, tmp_path)
