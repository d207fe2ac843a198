"""One steered generation beside the unsteered one, for `pocketlm demo`.

The cloud only ever receives chat(prompt) token ids; the context stays with the device model.
"""

from __future__ import annotations

from .decoding import SteerRequest
from .methods import get_method
from .session import load_engine


def steered_vs_plain(cloud_spec: str, local_spec: str, context: str, prompt: str, max_new_tokens: int = 48,
                     device: str | None = None, method: str = "closed_form", guards=()) -> tuple[str, str]:
    """Return (plain cloud text, steered text) for `prompt`, greedy; the same model may be cloud and device.
    `guards` (e.g. the leak guard) apply to the steered row."""
    engine = load_engine(cloud_spec, local_spec, device=device)
    req = SteerRequest.with_context(prompt, context)
    plain, steered = engine.generate([req, req], [get_method("cloud"), get_method(method).with_guards(*guards)],
                                     max_new_tokens=max_new_tokens)
    return plain.text, steered.text
