"""What one cloud step gives the fusion, whatever the backend sent: a log-policy over the fused vocabulary and,
for a truncated (top-k) step, which of its entries are exact.

Why its own object: backends answer with dense logits (in process, the step server's f32/f16/bf16 rows) or with
`TopKLogits` (the certified top-k downlink, an OpenAI-compatible server's top logprobs). The decode loop should
not care which: it reads `policy` and `known`, and hands `top` to the certification stage (None when dense).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fusion.formulas import log_policy


@dataclass
class CloudStep:
    policy: torch.Tensor | None        # [B, V] log p_cloud over the fused vocabulary (unknown ids at the bound)
    known: torch.Tensor | None = None  # [B, V] bool where the step was truncated, else None
    top: object | None = None          # the `TopKLogits` a truncated step came as (what certification reads)
    logits: torch.Tensor | None = None  # the dense logits as sent (the mapped-vocabulary EOS rule reads them)

    @classmethod
    def of(cls, raw, align, device) -> CloudStep:
        """Normalise a backend's answer once for every method in the batch (`align`: the engine's VocabAlign)."""
        if raw is None:
            return cls(None)
        dense = getattr(raw, "dense", None)  # a truncated step knows how to fill its unknown ids
        if dense is not None:
            policy, known = dense(align.size, device=device)
            return cls(policy, known, raw)
        return cls(log_policy(align.cloud_view(raw)), logits=raw)

    def eos_mass(self, p: int, eos: list[int]) -> float:
        """Row p's cloud probability of ending (dense steps only)."""
        return float(log_policy(self.logits[p:p + 1])[0, eos].exp().sum())
