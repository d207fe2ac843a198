"""Fusion rules as objects: each maps one step's cloud and device scores to the scores a token is chosen from.

In the spirit of HF's `LogitsProcessor` and PEFT's `LoraVariant`: a rule owns and validates its parameters,
declares which streams it needs (what the cloud is prompted with, whether the device runs with / without the
private context) and, per row and step, whether it still needs the device. Rules with per-row state (the
adaptive kappa, AdaCoSteer's gate) get a fresh copy of that state from `start()` for every generation, so one
rule object can serve many generations and threads. The math lives in `fusion.py`; the decoder (decoding.py)
only calls `start`, `needs_device` and `fuse`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch

from ...errors import PocketLMError
from . import formulas as F


@dataclass(frozen=True)
class StepView:
    """One step's aligned, normalised log-policies for a set of rows (None where a stream does not run).

    cloud = b = log p_cloud(.|x); ctx = log p_dev(.|c, x); plain = log p_dev(.|x); rows = each row's request
    index (CPU), for rules that keep per-row state."""

    cloud: torch.Tensor | None
    ctx: torch.Tensor | None
    plain: torch.Tensor | None
    rows: torch.Tensor
    known: torch.Tensor | None = None  # [n, V] bool where the cloud came down truncated (topk.py); else None

    @property
    def delta(self) -> torch.Tensor:
        """What the private context changes, on the device: log p(.|c,x) - log p(.|x)."""
        return self.ctx - self.plain

    def select(self, pos: torch.Tensor) -> StepView:
        """The rows at positions `pos` (a device tensor) of this view."""
        def pick(t):
            return None if t is None else t[pos]
        return StepView(pick(self.cloud), pick(self.ctx), pick(self.plain), self.rows[pos.cpu()], pick(self.known))


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise PocketLMError(what)


def finite_kappa(kappa: float) -> float:
    """kappa must be a finite number >= 0: NaN passes a `kappa < 0` check and infinity decodes garbage."""
    _check(isinstance(kappa, int | float) and not isinstance(kappa, bool), f"kappa must be a number, got {kappa!r}")
    _check(math.isfinite(kappa) and kappa >= 0, f"kappa must be a finite number >= 0, got {kappa}")
    return float(kappa)


class FusionRule:
    """Base: a rule that uses the cloud on the public query and both device streams."""

    kind: ClassVar[str] = "rule"
    cloud_prompt: ClassVar[str | None] = "query"  # "query", "context" (NOT private) or None (no cloud)
    needs_plain: ClassVar[bool] = True
    needs_ctx: ClassVar[bool] = True
    steers: ClassVar[bool] = True                 # its tokens count as steered

    def validate(self) -> None:
        """Raise PocketLMError on bad parameters (called at construction)."""

    def __post_init__(self):
        self.validate()

    @property
    def uses_device(self) -> bool:
        return self.needs_plain or self.needs_ctx

    def start(self, batch: int) -> FusionRule:
        """The rule for one generation of `batch` requests (stateless rules return themselves)."""
        return self

    def needs_device(self, rows: torch.Tensor) -> torch.Tensor:
        """Which of these (request-index) rows still need the device streams this step."""
        return torch.full((rows.numel(),), self.uses_device, dtype=torch.bool)

    def fuse(self, view: StepView) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores `[n, V]` to choose from, which rows were steered `[n]` bool on the CPU)."""
        raise NotImplementedError

    def draft(self, view: StepView) -> torch.Tensor:
        """A stand-in for `fuse` that the device computes alone (a speculative draft, `view.cloud` None): the
        cloud's log-policy replaced by the device's own plain one. Reads per-row state, never advances it, and
        only has to be close to `fuse`: the verify decides with the true scores."""
        kappa = self.kappa_value()
        return F.closed_form_bd(view.plain, view.delta, kappa) if kappa is not None else view.plain

    def cloud_floor(self, cloud: torch.Tensor) -> torch.Tensor | None:
        """`[n]`: the cloud log-probability below which this rule drops a token whatever the device says (None:
        no such mask). Certifying a truncated cloud step (certify.py) re-applies it to ids fetched exactly."""
        return None

    def kappa_value(self) -> float | None:
        """The equivalent closed-form kappa (None for rules that do not steer)."""
        return getattr(self, "kappa", None)

    def with_kappa(self, kappa: float) -> FusionRule:
        raise PocketLMError(f"fusion rule {self.kind!r} takes no kappa")

    def _all(self, view: StepView, value: bool) -> torch.Tensor:
        return torch.full((view.rows.numel(),), value, dtype=torch.bool)


@dataclass(frozen=True)
class CloudOnly(FusionRule):
    """The cloud alone. prompt='context' shows the cloud the private context: an upper bound, NOT private."""

    prompt: str = "query"
    kind: ClassVar[str] = "cloud"
    needs_plain: ClassVar[bool] = False
    needs_ctx: ClassVar[bool] = False
    steers: ClassVar[bool] = False

    def validate(self) -> None:
        _check(self.prompt in ("query", "context"), f"cloud prompt must be 'query' or 'context', got {self.prompt!r}")

    @property
    def cloud_prompt(self) -> str:  # type: ignore[override]
        return self.prompt

    def fuse(self, view):
        return view.cloud, self._all(view, False)

    def draft(self, view):
        return view.ctx if self.prompt == "context" and view.ctx is not None else view.plain


@dataclass(frozen=True)
class DeviceOnly(FusionRule):
    """The device model alone, with the private context (no cloud)."""

    kind: ClassVar[str] = "device"
    cloud_prompt: ClassVar[str | None] = None
    needs_plain: ClassVar[bool] = False
    steers: ClassVar[bool] = False

    def fuse(self, view):
        return view.ctx, self._all(view, False)

    def draft(self, view):
        return view.ctx


@dataclass(frozen=True)
class FTRLLoop(FusionRule):
    """The official CoSteer update: T inner FTRL steps per token (equal to the closed form at kappa_T)."""

    T: int = F.DEFAULT_T
    alpha: float = F.DEFAULT_ALPHA
    beta: float = F.DEFAULT_BETA
    lam: float = F.DEFAULT_LAMBDA
    eta: float = F.DEFAULT_ETA
    kind: ClassVar[str] = "loop"

    def validate(self) -> None:
        _check(isinstance(self.T, int) and self.T >= 1, f"T must be an integer >= 1, got {self.T!r}")
        for name in ("alpha", "beta", "lam", "eta"):
            v = getattr(self, name)
            _check(math.isfinite(v), f"{name} must be finite, got {v}")
        _check(self.lam >= 0 and self.eta > 0, f"need lambda >= 0 and eta > 0, got {self.lam}, {self.eta}")

    def kappa_value(self) -> float:
        return F.kappa_from_hparams(self.T, self.alpha, self.beta, self.lam, self.eta)

    def fuse(self, view):
        out = F.ftrl_loop_bd(view.cloud, view.delta, T=self.T, alpha=self.alpha, beta=self.beta, lam=self.lam,
                             eta=self.eta)
        return out, self._all(view, True)


@dataclass(frozen=True)
class ClosedForm(FusionRule):
    """log_softmax(b + kappa * delta): the T-step loop in one expression (kappa_20 = 1.7833)."""

    kappa: float = 1.7833
    kind: ClassVar[str] = "closed"

    def validate(self) -> None:
        object.__setattr__(self, "kappa", finite_kappa(self.kappa))

    def with_kappa(self, kappa: float) -> FusionRule:
        return replace(self, kappa=kappa)

    def fuse(self, view):
        return F.closed_form_bd(view.cloud, view.delta, self.kappa), self._all(view, True)


@dataclass(frozen=True)
class Plausible(ClosedForm):
    """The closed form restricted to tokens the cloud finds plausible: p_cloud >= a * max p_cloud."""

    a: float = 0.1
    kind: ClassVar[str] = "plausible"

    def validate(self) -> None:
        super().validate()
        _check(0 < self.a <= 1, f"plausibility threshold must be in (0, 1], got {self.a}")

    def cloud_floor(self, cloud):
        return cloud.max(dim=-1).values + math.log(self.a)

    def fuse(self, view):
        return F.plausible_bd(view.cloud, view.delta, self.kappa, self.a), self._all(view, True)

    def draft(self, view):
        return F.plausible_bd(view.plain, view.delta, self.kappa, self.a)


@dataclass(frozen=True)
class Adaptive(ClosedForm):
    """Per-token kappa scaled by JS(device+ctx || device) over its running mean, capped (see fusion.AdaptiveKappa)."""

    cap: float = 3.0
    state: F.AdaptiveKappa | None = field(default=None, compare=False, repr=False)
    kind: ClassVar[str] = "adaptive"

    def validate(self) -> None:
        super().validate()
        _check(math.isfinite(self.cap) and self.cap > 0, f"adaptive cap must be a finite number > 0, got {self.cap}")

    def start(self, batch):
        return replace(self, state=F.AdaptiveKappa(batch, self.kappa, self.cap))

    def fuse(self, view):
        k = self.state(view.ctx, view.plain, view.rows, normalised=True)
        return F.closed_form_bd(view.cloud, view.delta, k), self._all(view, True)


@dataclass(frozen=True)
class Gated(ClosedForm):
    """AdaCoSteer: the closed form until the cloud is confident (1 - max p < threshold) `patience` tokens in a
    row; then the cloud alone for the rest of that response, and the device streams may stop."""

    threshold: float = 0.1
    patience: int = 3
    state: F.AdaGate | None = field(default=None, compare=False, repr=False)
    kind: ClassVar[str] = "gated"

    def validate(self) -> None:
        super().validate()
        _check(0 <= self.threshold <= 1, f"gate threshold must be in [0, 1], got {self.threshold}")
        _check(isinstance(self.patience, int) and self.patience >= 1, f"gate patience must be >= 1, got {self.patience}")

    def start(self, batch):
        return replace(self, state=F.AdaGate(batch, self.threshold, self.patience))

    def needs_device(self, rows):
        return self.state.active[rows.cpu()].clone()

    def draft(self, view):
        on = self.state.active[view.rows.cpu()].to(view.plain.device)
        return torch.where(on.unsqueeze(-1), F.closed_form_bd(view.plain, view.delta, self.kappa), view.plain)

    def fuse(self, view):
        on = self.state.update(view.cloud, view.rows, normalised=True)
        out = view.cloud.clone()
        if bool(on.any()):
            out[on] = F.closed_form_bd(view.cloud[on], view.delta[on], self.kappa)
        return out, on.cpu()


@dataclass(frozen=True)
class SpecSteer(ClosedForm):
    """SpecSteer as its authors run it (arXiv 2603.16219): the device drafts with the context (greedy on
    p_dev(.|c,x)); the cloud accepts draft token d while p_cloud(d) >= gamma * p_dev(d|x); at the first rejection
    (and after a fully accepted draft) it emits argmax(log p_cloud + beta * delta), the closed form at
    kappa = beta. Its output is not CoSteer's: the ratio test is the approximation exact speculation avoids."""

    gamma: float = 0.1
    draft_length: int = 4
    kind: ClassVar[str] = "specsteer"

    def validate(self) -> None:
        super().validate()
        _check(0 < self.gamma <= 1 and math.isfinite(self.gamma), f"specsteer gamma must be in (0, 1], got {self.gamma}")
        _check(isinstance(self.draft_length, int) and self.draft_length >= 1,
               f"specsteer draft length must be >= 1, got {self.draft_length}")

    def draft(self, view):
        return view.ctx

    def accepts(self, view: StepView, tokens: torch.Tensor) -> torch.Tensor:
        """`[n]` bool: the ratio test p_cloud(d) / p_dev(d|x) >= gamma for draft tokens `tokens` `[n]`."""
        t = tokens.view(-1, 1).to(view.cloud.device)
        ratio = view.cloud.gather(-1, t) - view.plain.gather(-1, t)
        return (ratio.view(-1) >= math.log(self.gamma)).cpu()
