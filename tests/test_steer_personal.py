"""The personal model steers: a user's CoMiGS adapters load onto the base, adapters switch per row inside one
batched forward, and the `weights` / `both` / `specialist` signals decode what their formulas say."""

from __future__ import annotations

import pytest
import torch

from personal_fixtures import trained_user
from pocketlm.errors import PocketLMError
from pocketlm.models import build_tiny
from pocketlm.moe import MoEConfig, inject_moe, shared_base_view
from pocketlm.moe.personal import ADAPTER_CONFIG, load_personal
from pocketlm.moe.row_adapters import BASE, PERSONAL, SHARED, adapter_rows
from pocketlm.steer.cloud.in_process import HFCloudBackend
from pocketlm.steer.engine import SteerEngine, SteerRequest
from pocketlm.steer.fusion.methods import get_method


@pytest.fixture(scope="module")
def base():
    return build_tiny("tiny-llama", seed=3)


def test_personal_model_round_trips_and_leaves_the_base_alone(base, tmp_path):
    model, folder = trained_user(base[0], tmp_path)
    assert (folder / ADAPTER_CONFIG).is_file()
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base[0](input_ids=ids).logits
    personal = load_personal(base[0], folder)
    with torch.no_grad():
        assert torch.allclose(personal(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        assert torch.equal(base[0](input_ids=ids).logits, before)  # the base (maybe the cloud) is untouched
    assert not any(p.requires_grad for p in personal.parameters()) and not personal.training


def test_adapters_switch_per_row_in_one_forward(base, tmp_path):
    _, folder = trained_user(base[0], tmp_path)
    personal = load_personal(base[0], folder)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [5, 6, 7, 8]])
    with torch.no_grad():
        with adapter_rows(personal, torch.tensor([True, False, False])):
            mixed = personal(input_ids=ids).logits
        on = personal(input_ids=ids).logits
        off = base[0](input_ids=ids).logits
    assert torch.allclose(mixed[0], on[0], atol=1e-5)
    assert torch.allclose(mixed[1:], off[1:], atol=1e-5)
    layers = [m for m in personal.modules() if hasattr(m, "ctx")]
    assert layers and all(m.ctx.rows is None for m in layers)  # nothing left behind


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_weights_signal_at_kappa_one_decodes_the_personal_model(base, tmp_path, kv):
    """cloud = the base: b + 1 * (log p_personal(.|x) - log p_base(.|x)) = log p_personal(.|x), so the steered
    cloud writes exactly what the personal model writes alone (through the per-row adapter switch)."""
    model, tok = base
    _, folder = trained_user(model, tmp_path)
    personal = load_personal(model, folder)
    eng = SteerEngine(HFCloudBackend(model, tok), tok, personal, tok, kv=kv)
    r = SteerRequest("Write a haiku.")
    steered, alone, cloud = eng.generate(
        [r, r, r], [get_method("closed_form@1").with_signal("weights"),
                    get_method("device_with_context").with_signal("weights"), get_method("cloud")],
        max_new_tokens=10, ignore_eos=True)
    assert steered.token_ids == alone.token_ids
    assert steered.token_ids != cloud.token_ids  # the adapters do change the text
    both = get_method("closed_form@1").with_signal("both")
    with pytest.raises(PocketLMError, match="needs a private context"):
        eng.generate([r], [both], max_new_tokens=2)
    g = eng.generate([SteerRequest.with_context("Write a haiku.", "I sail.")], [both], max_new_tokens=4)[0]
    assert g.steered_tokens == len(g.token_ids)


def _shared_only_model(base, model, shared_experts, attn_shared):
    """An independent construction of "the personal model with its private parts off": a copy whose private
    experts' and (if private) attention LoRA's B factors are zero, so each private expert is the base MLP."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            private_expert = ".experts." in n and int(n.split(".experts.", 1)[1].split(".", 1)[0]) not in shared_experts
            if n.endswith("lora_B") and (private_expert or (".attn_lora." in n and not attn_shared)):
                p.zero_()
    return ref


@pytest.mark.parametrize("shared", [("generalist", "attn_lora"), ("generalist",), ()])
def test_shared_rows_switch_off_exactly_the_private_parts(base, tmp_path, shared):
    """A SHARED row is the personal model with the private experts' LoRA (and a private attention LoRA) off and the
    router's gates kept; BASE and PERSONAL rows in the same forward are unchanged."""
    model, folder = trained_user(base[0], tmp_path, experts=3, shared=shared)
    personal = load_personal(base[0], folder)
    want = _shared_only_model(base[0], model, {0} if "generalist" in shared else set(), "attn_lora" in shared)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [5, 6, 7, 8]])
    with torch.no_grad():
        with adapter_rows(personal, torch.tensor([SHARED, BASE, PERSONAL])):
            mixed = personal(input_ids=ids).logits
        shared_only = want(input_ids=ids).logits
        assert torch.allclose(mixed[0], shared_only[0], atol=1e-5)
        assert torch.allclose(mixed[1], base[0](input_ids=ids[1:2]).logits[0], atol=1e-5)
        assert torch.allclose(mixed[2], personal(input_ids=ids[2:3]).logits[0], atol=1e-5)
        assert not torch.allclose(mixed[0], mixed[2], atol=1e-3)  # the private expert does change the output


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_specialist_signal_is_zero_when_everything_is_shared_and_personal_minus_shared_otherwise(base, tmp_path, kv):
    """With every part shared (FedAvg's layout) the specialist signal is exactly zero: the steered cloud is the
    cloud. Otherwise, with the cloud = the shared-only model, kappa 1 decodes the personal model itself."""
    model, tok = base
    _, folder = trained_user(model, tmp_path / "fedavg", experts=1, shared=("generalist", "attn_lora"))
    eng = SteerEngine(HFCloudBackend(model, tok), tok, load_personal(model, folder), tok, kv=kv)
    r = SteerRequest("Write a haiku.")
    steered, cloud = eng.generate([r, r], [get_method("closed_form@3").with_signal("specialist"),
                                           get_method("cloud")], max_new_tokens=8, ignore_eos=True)
    assert steered.token_ids == cloud.token_ids

    trained, folder = trained_user(model, tmp_path / "1g1s", experts=2)
    personal = load_personal(model, folder)
    shared_cloud = _shared_only_model(model, trained, {0}, True)
    eng = SteerEngine(HFCloudBackend(shared_cloud, tok), tok, personal, tok, kv=kv)
    steered, alone, cloud = eng.generate(
        [r, r, r], [get_method("closed_form@1").with_signal("specialist"),
                    get_method("device_with_context").with_signal("specialist"), get_method("cloud")],
        max_new_tokens=10, ignore_eos=True)
    assert steered.token_ids == alone.token_ids and steered.token_ids != cloud.token_ids


def test_shared_rows_need_a_model_loaded_with_its_parts(base):
    model = inject_moe(shared_base_view(base[0]), MoEConfig(num_experts=2))
    with pytest.raises(PocketLMError, match="SHARED row needs a personal model"):
        with adapter_rows(model, torch.tensor([SHARED])):
            pass


def test_bad_adapter_folders_are_clear_errors(base, tmp_path):
    model, _ = base
    with pytest.raises(PocketLMError, match="not found"):
        load_personal(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PocketLMError, match="not a user's adapter folder"):
        load_personal(model, tmp_path / "empty")
    _, folder = trained_user(model, tmp_path)
    other = build_tiny("tiny-qwen2", seed=1, vocab_size=300)[0]
    with pytest.raises(PocketLMError, match=f"{ADAPTER_CONFIG}.*another base"):
        load_personal(other, folder)
    (folder / "private.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PocketLMError, match="private.safetensors"):
        load_personal(model, folder)
