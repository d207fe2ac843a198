"""A user's adapter folder as a CoMiGS run leaves it, without training: the personal-steering tests need adapters
whose effect is large enough to change greedy tokens, which one tiny training step does not give."""

from __future__ import annotations

import torch

from pocketlm.moe import MoEConfig, inject_moe, save_parts, shared_base_view


def trained_user(base, tmp_path, experts=2, seed=0, shared=("generalist", "attn_lora")):
    """(the mixture model, its folder `tmp_path/users/de`): non-zero adapters (as after training), saved with
    `shared` as the parts the server averages."""
    model = inject_moe(shared_base_view(base), MoEConfig(num_experts=experts, seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "lora_B" in n else 0.1))
    save_parts(model, tmp_path / "users" / "de", set(shared))
    return model, tmp_path / "users" / "de"
