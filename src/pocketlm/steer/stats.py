"""What a `generate()` call returns besides its texts: where the time went and what the downlink fetched.

Why not attributes of the engine: an engine serves many calls (threads, a server's sessions); statistics of
"the last call" on a shared object are wrong as soon as two calls overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerateStats:
    timings: dict[str, float] = field(default_factory=dict)  # seconds: cloud, device, fusion, prefill_s, decode_s
    calls: dict[str, int] = field(default_factory=dict)      # forward calls (prefill + steps) per stream
    downlink: dict | None = None                             # certification counts (top-k clouds only)
    speculation: dict | None = None                          # rounds, drafted, accepted (speculative runs only)


class Generations(list):
    """The generations of one call (a list, as before) with their `stats`."""

    def __init__(self, items, stats: GenerateStats):
        super().__init__(items)
        self.stats = stats
