"""The mixture layer: fused == reference (outputs and gradients), base equivalence at init, roles, state files."""

from __future__ import annotations

import copy

import pytest
import torch

from pocketlm.bench.train_bench import saved_activation_bytes
from pocketlm.errors import PocketLMError
from pocketlm.models import TINY_MODELS, build_tiny
from pocketlm.moe import (
    MoEConfig,
    inject_moe,
    load_parts,
    load_trainable_state,
    mixture_layers,
    param_role,
    save_parts,
    trainable_state,
)


def randomize(model, seed=0):
    """Non-zero B and a sharp router: otherwise path equality would be trivially true."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.1)
            elif ".router." in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * 0.5)
    return model


@pytest.mark.parametrize("family", TINY_MODELS)
@pytest.mark.parametrize("experts,top_k", [(1, 2), (2, 2), (2, 1), (4, 2), (4, 1), (3, 3), (8, 2)])
@pytest.mark.parametrize("path,recompute", [("fused", False), ("fused", True), ("fused_dense", False),
                                            ("fused_dense", True)])
def test_fused_equals_reference(family, experts, top_k, path, recompute):
    base, _ = build_tiny(family, dtype=torch.float64)
    ids = torch.randint(0, 260, (2, 10), generator=torch.Generator().manual_seed(1))
    ref = randomize(inject_moe(copy.deepcopy(base), MoEConfig(num_experts=experts, top_k=top_k, path="reference")))
    fused = copy.deepcopy(ref)
    for _, m in mixture_layers(fused):
        m.path, m.recompute = path, recompute
    ref.train(), fused.train()
    for m in (ref, fused):  # GPT-2 has dropout: compare deterministic functions
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    a, b = ref(ids).logits, fused(ids).logits
    assert (a - b).abs().max() < 1e-10
    (a.square().mean()).backward()
    (b.square().mean()).backward()
    grads = dict(fused.named_parameters())
    checked = 0
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and grads[n].grad is not None, n
            assert torch.allclose(p.grad, grads[n].grad, atol=1e-10, rtol=1e-8), n
            checked += 1
    assert checked > 0


def test_topk_dispatch_and_recompute_keep_less_for_backward():
    """Top-k dispatch stores k (not E) experts' activations; recompute stores neither (memory, not time)."""
    base, _ = build_tiny("tiny-llama", dtype=torch.float32)
    ids = torch.randint(0, 260, (4, 32), generator=torch.Generator().manual_seed(0))
    saved = {}
    for path, recompute in [("reference", False), ("fused_dense", False), ("fused", False), ("fused", True)]:
        model = inject_moe(copy.deepcopy(base), MoEConfig(num_experts=8, top_k=2, path=path, recompute=recompute))
        saved[(path, recompute)] = saved_activation_bytes(model, ids)
    assert saved[("fused", False)] < 0.6 * saved[("fused_dense", False)] < saved[("reference", False)]
    assert saved[("fused", True)] < 0.7 * saved[("fused", False)]


@pytest.mark.parametrize("family", TINY_MODELS)
def test_injected_model_starts_as_base(family):
    base, _ = build_tiny(family)
    ids = torch.randint(0, 260, (1, 9))
    expected = base(ids).logits
    model = inject_moe(copy.deepcopy(base), MoEConfig(num_experts=2))
    assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(param_role(n) is not None for n in trainable)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(param_role(n) is None for n in frozen)


def test_roles_by_name():
    model = inject_moe(build_tiny("tiny-llama")[0], MoEConfig(num_experts=3))
    roles = {param_role(n) for n, p in model.named_parameters() if p.requires_grad}
    assert roles == {"generalist", "specialist", "router", "attn_lora"}
    assert param_role("model.layers.0.mlp.experts.0.up_proj.lora_A") == "generalist"
    assert param_role("model.layers.0.mlp.experts.2.up_proj.lora_A") == "specialist"
    assert param_role("model.layers.0.mlp.router.weight") == "router"
    assert param_role("model.layers.0.self_attn.q_proj.attn_lora.lora_B") == "attn_lora"
    assert param_role("model.layers.0.mlp.base.up_proj.weight") is None
    # E=1: generalist only, no router
    single = inject_moe(build_tiny("tiny-llama")[0], MoEConfig(num_experts=1))
    assert {param_role(n) for n, p in single.named_parameters() if p.requires_grad} == {"generalist", "attn_lora"}


def test_generalist_init_independent_of_expert_count():
    a = inject_moe(build_tiny("tiny-qwen2")[0], MoEConfig(num_experts=2, seed=3))
    b = inject_moe(build_tiny("tiny-qwen2")[0], MoEConfig(num_experts=4, seed=3))
    sa, sb = trainable_state(a, {"generalist", "attn_lora"}), trainable_state(b, {"generalist", "attn_lora"})
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_parts_round_trip(tmp_path):
    model = randomize(inject_moe(build_tiny("tiny-llama", dtype=torch.float64)[0], MoEConfig(num_experts=2)))
    ids = torch.randint(0, 260, (2, 8))
    shared, private = save_parts(model, tmp_path, {"generalist", "attn_lora"})
    from safetensors.torch import load_file

    assert {param_role(k) for k in load_file(str(shared))} == {"generalist", "attn_lora"}
    assert {param_role(k) for k in load_file(str(private))} == {"specialist", "router"}
    fresh = inject_moe(build_tiny("tiny-llama", dtype=torch.float64)[0], MoEConfig(num_experts=2))
    load_parts(fresh, tmp_path)
    assert torch.equal(model(ids).logits, fresh(ids).logits)


def test_bad_state_is_rejected_and_changes_nothing(tmp_path):
    model = inject_moe(build_tiny("tiny-llama")[0], MoEConfig(num_experts=2))
    before = trainable_state(model)
    name = next(iter(before))
    with pytest.raises(PocketLMError, match="shape"):
        load_trainable_state(model, {name: torch.ones(3, 3)})
    with pytest.raises(PocketLMError, match="unknown adapter"):
        load_trainable_state(model, {"nope.weight": torch.ones(1), name: before[name] + 1})
    after = trainable_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(PocketLMError, match="shared.safetensors"):
        load_parts(model, tmp_path)
    (tmp_path / "shared.safetensors").write_bytes(b"junk")
    with pytest.raises(PocketLMError, match="corrupt"):
        load_parts(model, tmp_path)


def test_unsupported_architecture_and_config():
    with pytest.raises(PocketLMError, match="cannot inject"):
        inject_moe(torch.nn.Sequential(torch.nn.Linear(2, 2)), MoEConfig())
    with pytest.raises(PocketLMError, match="unknown mixture path"):
        MoEConfig(path="sparse")
    with pytest.raises(PocketLMError, match="invalid"):
        MoEConfig(num_experts=0)
