"""Named decoding methods for comparison: which streams each needs and which fusion rule it applies.

`closed_form@0.5`, `plausible@1`, `adaptive@3`, `ada_costeer@1.2` pick kappa explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import PocketLMError
from .fusion import DEFAULT_T, FusionSpec, kappa_from_hparams

KAPPA_COSTEER = kappa_from_hparams(DEFAULT_T)  # 1.7833
KAPPA_LIGHT = kappa_from_hparams(1)            # 0.4762


@dataclass(frozen=True)
class Method:
    """cloud_prompt: what the cloud is prompted with ("query", "context" = not private, or None)."""

    name: str
    fusion: FusionSpec
    cloud_prompt: str | None = "query"
    device_plain: bool = True
    device_ctx: bool = True
    private: bool = True  # False: the cloud sees the private context (upper bound only)
    doc: str = ""


_BASE = {
    "cloud": Method("cloud", FusionSpec("cloud"), device_plain=False, device_ctx=False,
                    doc="cloud model alone, no context (privacy-safe baseline)"),
    "cloud_with_context": Method("cloud_with_context", FusionSpec("cloud"), cloud_prompt="context",
                                 device_plain=False, device_ctx=False, private=False,
                                 doc="cloud sees the private context: upper bound, NOT private"),
    "device_with_context": Method("device_with_context", FusionSpec("device"), cloud_prompt=None,
                                  device_plain=False, doc="device model alone with the context"),
    "costeer": Method("costeer", FusionSpec("loop", T=DEFAULT_T),
                      doc="faithful T=20 FTRL loop (alpha=2, beta=1, lambda=2, eta=10)"),
    "light_costeer": Method("light_costeer", FusionSpec("loop", T=1), doc="LightCoSteer: the loop with T=1"),
    "closed_form": Method("closed_form", FusionSpec("closed", kappa=KAPPA_COSTEER),
                          doc="log_softmax(b + kappa*delta), default kappa = k_20 = 1.7833"),
    "plausible": Method("plausible", FusionSpec("plausible", kappa=KAPPA_COSTEER),
                        doc="closed form restricted to p_cloud >= 0.1 * max p_cloud"),
    "adaptive": Method("adaptive", FusionSpec("adaptive", kappa=KAPPA_COSTEER),
                       doc="per-token kappa scaled by JS(device+ctx || device) / its running mean"),
    "ada_costeer": Method("ada_costeer", FusionSpec("gated", kappa=KAPPA_COSTEER),
                          doc="AdaCoSteer gate: steering off once the cloud is confident 3 tokens in a row"),
}
METHODS = tuple(_BASE)
_KAPPA_METHODS = ("closed_form", "plausible", "adaptive", "ada_costeer")


def get_method(name: str, kappa: float | None = None) -> Method:
    """Look a method up by name; `name@k` or `kappa=` sets kappa on the kappa-parameterised methods."""
    base, _, k = name.strip().partition("@")
    if base not in _BASE:
        raise PocketLMError(f"unknown steering method {base!r}; choose from {', '.join(METHODS)}")
    m = _BASE[base]
    if k:
        try:
            kappa = float(k)
        except ValueError:
            raise PocketLMError(f"bad kappa in method {name!r}: {k!r} is not a number") from None
    if kappa is not None:
        if base not in _KAPPA_METHODS:
            raise PocketLMError(f"method {base!r} takes no kappa (only {', '.join(_KAPPA_METHODS)})")
        if kappa < 0:
            raise PocketLMError(f"kappa must be >= 0, got {kappa}")
        m = replace(m, name=f"{base}@{kappa:g}" if k else m.name, fusion=replace(m.fusion, kappa=kappa))
    return m


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
