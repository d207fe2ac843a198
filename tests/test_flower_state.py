"""A device's private state on its own disk: a save/load round trip continues training exactly like an
uninterrupted device, an interrupted save leaves the previous state usable, and a corrupt, incomplete or foreign
file is a clear error naming the file (never a silent fresh start). No Flower needed."""

from __future__ import annotations

import json

import pytest
import torch

from pocketlm.collab import Device, load_config
from pocketlm.collab.flower.state import PrivateState, PrivateStateError
from pocketlm.collab.strategies import get_strategy
from pocketlm.data import build_scenario, read_folder
from pocketlm.models import load_model
from pocketlm.moe import inject_moe, shared_base_view

ID = {"user": "alice", "model": "tiny-llama", "strategy": "1g1s", "experts": 2, "rank": 8, "alpha": 16.0, "top_k": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import write_folder_corpus

    corpus = write_folder_corpus(tmp_path_factory.mktemp("c") / "corpus")
    cfg = load_config(None, {"model": "tiny-llama", "max_chars": None, "local_steps": 2, "batch_size": 2,
                             "seq_len": 16, "router_every": 2, "router_steps": 1, "seed": 0})
    base, tok = load_model("tiny-llama", seed=0)
    data = build_scenario(read_folder(corpus), tok, seed=0)["alice"]
    model = inject_moe(shared_base_view(base), get_strategy("1g1s").moe_config(cfg, 2))
    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return cfg, model, init, data


def new_device(setup) -> Device:
    cfg, model, init, data = setup
    d = Device("alice", model, cfg, bilevel=True, train_tokens=int(data.train.numel()), batch_size=cfg.batch_size)
    with torch.no_grad():
        for n, t in init.items():
            d.params[n].copy_(t)
    return d


def train(setup, d: Device) -> None:
    cfg, model, _, data = setup
    d.local_update(model, data.train, data.val, cfg.local_steps)  # binds its adapters itself


def test_saved_and_reloaded_device_continues_exactly_like_an_uninterrupted_one(setup, tmp_path):
    ref = new_device(setup)
    train(setup, ref)
    train(setup, ref)
    a = new_device(setup)
    train(setup, a)
    PrivateState(tmp_path, ID).save(a.state_dict(), {"rounds_done": 1})
    b = new_device(setup)            # a restarted process: fresh objects, state from disk
    state, meta = PrivateState(tmp_path, ID).load()
    b.load_state_dict(state)
    assert meta["rounds_done"] == 1 and b.step == setup[0].local_steps
    train(setup, b)
    for n in ref.params:
        torch.testing.assert_close(b.params[n], ref.params[n], msg=n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device-00000002.safetensors", "device.json"]


def test_an_interrupted_save_leaves_the_previous_state(setup, tmp_path):
    d = new_device(setup)
    store = PrivateState(tmp_path, ID)
    store.save(d.state_dict())
    # a crash after the new tensor file was written but before device.json was replaced
    (tmp_path / "device-00000009.safetensors").write_bytes(b"half a file")
    (tmp_path / "device.json.partial").write_text("{")
    state, meta = store.load()
    assert meta["tensors"] == "device-00000000.safetensors" and state["step"] == 0


def test_empty_directory_is_a_fresh_device_but_stray_tensors_are_an_error(tmp_path):
    assert PrivateState(tmp_path / "new", ID).load() is None
    (tmp_path / "device-00000002.safetensors").write_bytes(b"x")
    with pytest.raises(PrivateStateError, match="device-00000002.safetensors has no device.json"):
        PrivateState(tmp_path, ID).load()


def test_corrupt_files_are_errors_naming_the_file(setup, tmp_path):
    store = PrivateState(tmp_path, ID)
    path = store.save(new_device(setup).state_dict())
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PrivateStateError, match=rf"{path.name} is corrupt"):
        store.load()
    store.meta_path.write_text("{not json")
    with pytest.raises(PrivateStateError, match=r"device.json is corrupt"):
        store.load()


def test_state_of_another_device_or_setup_is_refused(setup, tmp_path):
    PrivateState(tmp_path, ID).save(new_device(setup).state_dict())
    with pytest.raises(PrivateStateError, match=r"device.json belongs to another device or setup \(experts: saved 2"):
        PrivateState(tmp_path, {**ID, "experts": 3}).load()
    with pytest.raises(PrivateStateError, match="user: saved 'alice' != now 'bob'"):
        PrivateState(tmp_path, {**ID, "user": "bob"}).load()
    meta = json.loads((tmp_path / "device.json").read_text())
    state, _ = PrivateState(tmp_path, ID).load()
    wrong = {n: t for n, t in new_device(setup).params.items() if ".experts.1." not in n}
    with pytest.raises(PrivateStateError, match=rf"{meta['tensors']} does not fit this device: missing \[\]"):
        PrivateState(tmp_path, ID).check_params(state, wrong, tmp_path / meta["tensors"])
