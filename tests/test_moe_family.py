"""Model families are objects: each owns its MLP projection names, activation and attention projections, and
injection, the fused paths and the reference path ask it instead of comparing family names."""

from __future__ import annotations

import pytest
import torch

from pocketlm.models import build_tiny
from pocketlm.moe import MixtureMLP, MoEConfig, inject_moe
from pocketlm.moe.family import GATED, GPT2, adapter_targets, family_of, mlp_blocks


@pytest.mark.parametrize(("name", "family"), [("tiny-llama", GATED), ("tiny-qwen2", GATED), ("tiny-gpt2", GPT2)])
def test_family_describes_the_mlp_it_was_found_on(name, family):
    model, _ = build_tiny(name, seed=0)
    blocks = mlp_blocks(model)
    assert len(blocks) == 2 and all(fam is family for *_, fam in blocks)
    mlp = blocks[0][2]
    x = torch.randn(3, 5, model.config.hidden_size)
    with torch.no_grad():   # its projections, activation and finish recompute the MLP's own forward
        own = mlp(x)
        rebuilt = family.finish(mlp, getattr(mlp, family.last)(family.act(mlp, [getattr(mlp, n)(x)
                                                                               for n in family.firsts])))
    assert torch.allclose(own, rebuilt, atol=1e-6)


def test_injected_mixtures_hold_the_family_object_and_are_not_found_again():
    model = inject_moe(build_tiny("tiny-gpt2", seed=0)[0], MoEConfig(num_experts=2, rank=4))
    mixtures = [m for m in model.modules() if isinstance(m, MixtureMLP)]
    assert mixtures and all(m.family is GPT2 for m in mixtures)
    assert mlp_blocks(model) == []                  # a mixture has no family layout of its own
    assert family_of(torch.nn.Linear(2, 2)) is None


def test_adapter_targets_name_every_attention_and_mlp_projection():
    assert adapter_targets(build_tiny("tiny-llama")[0]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert adapter_targets(build_tiny("tiny-gpt2")[0]) == ["c_attn", "c_fc", "c_proj"]
    assert adapter_targets(torch.nn.Linear(2, 2)) == []
