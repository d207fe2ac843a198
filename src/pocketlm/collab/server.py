"""The CoMiGS server: averages what the strategy shares (generalists + attention LoRA by default).

It sees only uploads of shared roles, never specialists or routers. Uploads are checked before they touch the
global state: a user whose upload has a non-finite value, an unknown tensor or a wrong shape is rejected with
a log line, and the round goes on with the others (one broken device must not poison everyone).
Heterogeneous devices are natural here: tensors are averaged by name over the users that hold them, so a
generalist-only device (E=1) and a device with 3 specialists share the same generalist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import PocketLMError
from ..moe import param_role

log = logging.getLogger(__name__)


@dataclass
class Upload:
    user: str
    state: dict[str, torch.Tensor]
    train_tokens: int


@dataclass
class RoundReport:
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)


class Server:
    def __init__(self, shared_roles, aggregation: str = "uniform"):
        if aggregation not in ("uniform", "tokens"):
            raise PocketLMError(f"unknown aggregation {aggregation!r}; use 'uniform' or 'tokens'")
        self.shared_roles = frozenset(shared_roles)
        self.aggregation = aggregation
        self.global_state: dict[str, torch.Tensor] = {}

    def shares(self, name: str) -> bool:
        return param_role(name) in self.shared_roles

    def init_from(self, states: list[dict[str, torch.Tensor]]) -> None:
        """The initial global state: each shared tensor from the first user holding it (all users initialise
        shared tensors identically, from the seed and the tensor's name)."""
        self.global_state = {}
        for state in states:
            for n, t in state.items():
                if self.shares(n) and n not in self.global_state:
                    self.global_state[n] = t.detach().cpu().float().clone()

    def check(self, upload: Upload) -> str | None:
        """Why this upload must be rejected, or None."""
        if upload.train_tokens < 0:
            return f"negative token count {upload.train_tokens}"
        for n, t in upload.state.items():
            ref = self.global_state.get(n)
            if ref is None:
                return f"unknown or non-shared tensor {n!r}"
            if tuple(t.shape) != tuple(ref.shape):
                return f"{n}: shape {tuple(t.shape)} != {tuple(ref.shape)}"
            if not torch.isfinite(t).all():
                return f"{n}: non-finite values"
        return None

    def aggregate(self, uploads: list[Upload]) -> RoundReport:
        """Replace each shared tensor by the (uniform or token-weighted) mean of the accepted uploads."""
        report = RoundReport()
        good = []
        for up in uploads:
            why = self.check(up)
            if why:
                report.rejected[up.user] = why
                log.warning("server: rejected the update of %s: %s", up.user, why)
            else:
                report.accepted.append(up.user)
                good.append(up)
        sums: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        for up in good:
            w = 1.0 if self.aggregation == "uniform" else float(up.train_tokens)
            for n, t in up.state.items():
                sums[n] = sums.get(n, 0) + w * t.detach().cpu().float()
                weights[n] = weights.get(n, 0.0) + w
        for n, s in sums.items():
            if weights[n] > 0:
                self.global_state[n] = s / weights[n]
        return report

    def upload_bytes(self) -> int:
        return sum(t.numel() * 4 for t in self.global_state.values())
