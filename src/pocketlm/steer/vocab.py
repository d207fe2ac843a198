"""One fused vocabulary for cloud and device logits.

`shared` (default): both models use one tokenizer; logits are sliced to the rows both LM heads and the
tokenizer have (Qwen2.5-7B pads its head to 152,064 rows, 0.5B/1.5B to 151,936; the tokenizer has fewer).
`intersection` (official cross-family option, CoSteer §5.2): fuse on the token *strings* both tokenizers
share, then map the chosen fused index back to each model's own id.
"""

from __future__ import annotations

import torch

from ..errors import ModelLoadError
from ..models.vocab import check_same_tokenizer, head_rows


def _rows(model_or_rows) -> int:
    if isinstance(model_or_rows, int):
        return model_or_rows
    return head_rows(model_or_rows)


class VocabAlign:
    """Maps `[B, V_model]` logits to `[B, V]` fused logits, and fused indices back to model ids."""

    def __init__(self, mode: str, size: int, cloud_index: torch.Tensor | None = None,
                 device_index: torch.Tensor | None = None):
        self.mode, self.size = mode, size
        self.cloud_index, self.device_index = cloud_index, device_index

    @classmethod
    def shared(cls, cloud_tok, device_tok, cloud_rows, device_rows, to_tokenizer: bool = True) -> VocabAlign:
        """Same tokenizer required (clear error otherwise); slice to the common row count (and, by default,
        to the tokenizer's size: rows past it are padding no text maps to). Benchmarks on random geometries
        pass `to_tokenizer=False` to keep the real vocabulary width with a stand-in tokenizer."""
        check_same_tokenizer(cloud_tok, device_tok)
        n = min(_rows(cloud_rows), _rows(device_rows))
        return cls("shared", min(n, len(cloud_tok)) if to_tokenizer else n)

    @classmethod
    def intersection(cls, cloud_tok, device_tok, cloud_rows, device_rows) -> VocabAlign:
        vc, vd = cloud_tok.get_vocab(), device_tok.get_vocab()
        rc, rd = _rows(cloud_rows), _rows(device_rows)
        common = sorted((i, vd[s]) for s, i in vc.items() if s in vd and i < rc and vd[s] < rd)
        if not common:
            raise ModelLoadError("the cloud and device tokenizers share no token strings")
        ci = torch.tensor([c for c, _ in common], dtype=torch.long)
        di = torch.tensor([d for _, d in common], dtype=torch.long)
        return cls("intersection", len(common), ci, di)

    @classmethod
    def build(cls, mode: str, cloud_tok, device_tok, cloud_rows, device_rows, to_tokenizer: bool = True) -> VocabAlign:
        if mode == "shared":
            return cls.shared(cloud_tok, device_tok, cloud_rows, device_rows, to_tokenizer)
        if mode == "intersection":
            return cls.intersection(cloud_tok, device_tok, cloud_rows, device_rows)
        raise ModelLoadError(f"unknown vocabulary mode {mode!r}; choose shared or intersection")

    def cloud_view(self, logits: torch.Tensor) -> torch.Tensor:
        if self.cloud_index is None:
            return logits[..., : self.size]
        return logits.index_select(-1, self.cloud_index.to(logits.device))

    def device_view(self, logits: torch.Tensor) -> torch.Tensor:
        if self.device_index is None:
            return logits[..., : self.size]
        return logits.index_select(-1, self.device_index.to(logits.device))

    def to_cloud(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.cloud_index is None else self.cloud_index.to(idx.device)[idx]

    def to_device(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.device_index is None else self.device_index.to(idx.device)[idx]

    def from_device(self, device_ids: torch.Tensor) -> torch.Tensor:
        """Fused index of device ids (shared mode: identity). Ids outside the intersection map to 0."""
        if self.device_index is None:
            return device_ids
        lut = torch.zeros(int(self.device_index.max()) + 1, dtype=torch.long, device=device_ids.device)
        lut[self.device_index.to(device_ids.device)] = torch.arange(self.size, device=device_ids.device)
        return lut[device_ids.clamp_max(lut.numel() - 1)]
