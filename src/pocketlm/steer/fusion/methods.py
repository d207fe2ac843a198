"""Named decoding methods: a name, a fusion rule object (rules.py) and the guards applied after it.

`closed_form@0.5`, `plausible@1`, `adaptive@3`, `ada_costeer@1.2` pick kappa explicitly; the rule validates it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ...errors import PocketLMError
from ...moe.row_adapters import BASE, PERSONAL, SHARED
from .formulas import DEFAULT_T, kappa_from_hparams
from .rules import (
    Adaptive,
    ClosedForm,
    CloudOnly,
    DeviceOnly,
    FTRLLoop,
    FusionRule,
    Gated,
    Plausible,
    SpecSteer,
)

# delta = informed - reference, on the device:
#   context: log p_dev(.|context, x) - log p_dev(.|x)             (CoSteer; the device model as it is)
#   weights: log p_personal(.|x) - log p_base(.|x)                (what the user's adapters learned; no context)
#   both:    log p_personal(.|context, x) - log p_base(.|x)
#   specialist: log p_personal(.|x) - log p_shared(.|x)       (what the user's PRIVATE experts add over the
#               federation's shared parts: the corpus format every user learned cancels; no context needed)
SIGNALS = ("context", "weights", "both", "specialist")
NO_CONTEXT_SIGNALS = ("weights", "specialist")
# which model the reference (plain) stream runs for each signal: a moe.row_adapters row mode
REFERENCE_MODE = {"context": PERSONAL, "weights": BASE, "both": BASE, "specialist": SHARED}

KAPPA_COSTEER = kappa_from_hparams(DEFAULT_T)  # 1.7833
KAPPA_LIGHT = kappa_from_hparams(1)            # 0.4762


@dataclass(frozen=True)
class Method:
    """A rule plus guards (guards.py) that compose after it, under one name for tables and JSON."""

    name: str
    rule: FusionRule
    doc: str = ""
    guards: tuple = ()
    signal: str = "context"   # what steers: see SIGNALS

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise PocketLMError(f"unknown steering signal {self.signal!r}; choose from {', '.join(SIGNALS)}")

    @property
    def private(self) -> bool:
        """False when the cloud sees the private context (the upper-bound method only)."""
        return self.rule.cloud_prompt != "context"

    @property
    def cloud_prompt(self) -> str | None:
        return self.rule.cloud_prompt

    @property
    def needs_context(self) -> bool:
        """Does a request decoded with this method need a private context?"""
        return self.cloud_prompt == "context" or (self.rule.needs_ctx and self.signal not in NO_CONTEXT_SIGNALS)

    def with_signal(self, signal: str) -> Method:
        return replace(self, signal=signal)

    def with_guards(self, *guards) -> Method:
        return replace(self, guards=self.guards + tuple(g for g in guards if g is not None))


_BASE = {
    "cloud": Method("cloud", CloudOnly(), "cloud model alone, no context (privacy-safe baseline)"),
    "cloud_with_context": Method("cloud_with_context", CloudOnly("context"),
                                 "cloud sees the private context: upper bound, NOT private"),
    "device_with_context": Method("device_with_context", DeviceOnly(), "device model alone with the context"),
    "costeer": Method("costeer", FTRLLoop(T=DEFAULT_T), "faithful T=20 FTRL loop (alpha=2, beta=1, lambda=2, eta=10)"),
    "light_costeer": Method("light_costeer", FTRLLoop(T=1), "LightCoSteer: the loop with T=1"),
    "closed_form": Method("closed_form", ClosedForm(KAPPA_COSTEER),
                          "log_softmax(b + kappa*delta), default kappa = k_20 = 1.7833"),
    "plausible": Method("plausible", Plausible(KAPPA_COSTEER), "closed form restricted to p_cloud >= 0.1 * max p_cloud"),
    "adaptive": Method("adaptive", Adaptive(KAPPA_COSTEER),
                       "per-token kappa scaled by JS(device+ctx || device) / its running mean"),
    "ada_costeer": Method("ada_costeer", Gated(KAPPA_COSTEER),
                          "AdaCoSteer gate: steering off once the cloud is confident 3 tokens in a row"),
    "specsteer": Method("specsteer", SpecSteer(1.0),
                        "SpecSteer: device drafts 4 with context, cloud accepts p_cloud >= 0.1 p_dev(.|x), else "
                        "argmax(b + beta*delta); specsteer@BETA or @BETA:GAMMA (approximate, not CoSteer's output)"),
}
METHODS = tuple(_BASE)


def get_method(name: str, kappa: float | None = None) -> Method:
    """Look a method up by name; `name@k` or `kappa=` sets kappa on the kappa-parameterised methods."""
    base, at, k = name.strip().partition("@")
    if base not in _BASE:
        raise PocketLMError(f"unknown steering method {base!r}; choose from {', '.join(METHODS)}")
    m = _BASE[base]
    if at and base == "specsteer" and ":" in k:  # specsteer@BETA:GAMMA
        k, _, gamma = k.partition(":")
        try:
            m = replace(m, rule=replace(m.rule, gamma=float(gamma)))
        except (ValueError, PocketLMError) as e:
            raise PocketLMError(f"bad gamma in method {name!r}: {e}") from None
    if at:
        try:
            kappa = float(k)
        except ValueError:
            raise PocketLMError(f"bad kappa in method {name!r}: {k!r} is not a number") from None
    if kappa is None:
        return m
    try:
        rule = m.rule.with_kappa(kappa)
    except PocketLMError as e:
        raise PocketLMError(f"method {base!r}: {e}") from None
    name = f"{base}@{kappa:g}" if at else m.name
    if at and base == "specsteer" and rule.gamma != _BASE[base].rule.gamma:
        name += f":{rule.gamma:g}"
    return replace(m, name=name, rule=rule)


def parse_methods(spec: str, kappas: str | None = None) -> list[Method]:
    """Comma list of names; `kappas` ("0.5,1,3") adds `closed_form@k` for each k."""
    out = [get_method(n) for n in spec.split(",") if n.strip()]
    for k in (kappas or "").split(","):
        if k.strip():
            out.append(get_method(f"closed_form@{k.strip()}"))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise PocketLMError(f"duplicate methods in {names}")
    if not out:
        raise PocketLMError("no methods given")
    return out
